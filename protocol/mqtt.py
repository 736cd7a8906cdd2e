"""What every MQTT client of FedIoMT shares (device link, edge gateway, cloud, OTA push): the broker settings, one
way to build a paho 2.x MQTT 5 client (TLS with client certificates, or username/password), Nagle off,
reconnect back-off with jitter, and the daemons' `Connection` (manual acknowledgements into a bounded inbox).
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from protocol.logs import event
from protocol.tls import client_context


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
        client.tls_set_context(client_context(cfg.ca, cfg.cert, cfg.key))
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


INBOX_SIZE = 10_000  # a full inbox blocks paho's thread: TCP back-pressure instead of unbounded memory


class Connection:
    """One paho client with manual acknowledgements; messages go to `inbox` as (conn, topic, payload, mid, qos)."""

    def __init__(self, cfg: BrokerConfig, client_id: str, subscriptions: list[str], inbox: queue.Queue,
                 log: logging.Logger, manual_ack: bool = True) -> None:
        self.cfg, self.subscriptions, self.inbox, self.log = cfg, subscriptions, inbox, log
        self.connected = threading.Event()
        self.subscribed = threading.Event()   # the broker granted the subscriptions (SUBACK)
        client = new_client(cfg, client_id, manual_ack=manual_ack)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = lambda *_: self.subscribed.set()
        client.on_message = lambda _c, _u, m: self.inbox.put((self, m.topic, m.payload, m.mid, m.qos))
        self.client = client

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            event(self.log, "broker refused the connection", logging.WARNING, reason=str(reason_code))
            return
        tcp_nodelay(client)
        if self.subscriptions:
            client.subscribe([(t, SubscribeOptions(qos=1)) for t in self.subscriptions])
        self.connected.set()
        event(self.log, "connected", host=self.cfg.host, port=self.cfg.port)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        self.connected.clear()
        self.subscribed.clear()
        event(self.log, "disconnected", logging.WARNING, reason=str(reason_code))

    def start(self, stop: threading.Event) -> bool:
        props = connect_properties(self.cfg)
        for delay in backoff_delays(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s):
            if stop.is_set():
                return False
            try:
                self.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                                    clean_start=self.cfg.session_expiry_s == 0, properties=props)
                break
            except OSError as exc:
                event(self.log, "connect failed, retrying", logging.WARNING, error=str(exc), retry_in_s=round(delay, 2))
                stop.wait(delay)
        self.client.loop_start()
        return True

    def ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self.client.ack(mid, qos)

    def unsubscribe(self) -> None:
        if self.subscriptions and self.connected.is_set():
            self.client.unsubscribe(self.subscriptions)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
