"""What every MQTT client of FedIoMT shares (device link, edge gateway, cloud, OTA push): the broker settings, one
way to build a paho 2.x MQTT 5 client (TLS with client certificates, or username/password), Nagle off, and
reconnect back-off with jitter.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass(frozen=True)
class BrokerConfig:
    """An MQTT broker connection. TLS when `ca` is set (client certificate with `cert`/`key`)."""

    host: str = "127.0.0.1"
    port: int = 1883
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = 30                  # seconds between PINGREQs; the broker declares us dead after 1.5x
    session_expiry_s: int = 0            # 0 = clean session; > 0 = persistent: queued QoS 1 messages wait this long
    reconnect_min_s: float = 1.0         # exponential back-off with jitter between these bounds
    reconnect_max_s: float = 60.0
    max_message_bytes: int = 256 * 1024  # the broker's message cap: senders chunk or compress below it

    def __post_init__(self) -> None:
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("broker: need 0 < reconnect_min_s <= reconnect_max_s")


def new_client(cfg: BrokerConfig, client_id: str, **options) -> mqtt.Client:
    """A paho 2.x MQTT 5 client with the configured TLS / credentials (not connected yet)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, **options)
    if cfg.ca is not None:
        client.tls_set(ca_certs=str(cfg.ca), certfile=str(cfg.cert) if cfg.cert else None,
                       keyfile=str(cfg.key) if cfg.key else None)
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password)
    return client


def connect_properties(cfg: BrokerConfig) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = cfg.session_expiry_s
    return props


def tcp_nodelay(client: mqtt.Client) -> None:
    """Nagle off (call in on_connect): over TLS, messages > 16 KB otherwise wait ~90 ms for delayed ACKs."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def backoff_delays(min_s: float, max_s: float, rng: random.Random | None = None) -> Iterator[float]:
    """Exponential back-off with full jitter: attempt k waits uniform(min_s, min(max_s, min_s * 2**k)), so a ward
    of devices rebooting together does not hammer the broker in lock-step."""
    rng = rng or random.Random()
    ceiling = min_s
    while True:
        yield rng.uniform(min_s, ceiling)
        ceiling = min(max_s, ceiling * 2)
