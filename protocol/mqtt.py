"""The one MQTT client layer of FedIoMT (device agent, OTA, edge gateway, cloud, ledger replication, OTA push): the
connection settings, one way to build a paho 2.x MQTT 5 client (TLS with client certificates, or username/password),
Nagle off, reconnect back-off with jitter, and `Connection` (last will, persistent sessions, subscribe on connect,
inbox with manual acknowledgements or callback delivery).
"""

from __future__ import annotations

import logging
import math
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from protocol.logs import event
from protocol.tls import client_context, role_files


@dataclass(frozen=True)
class ConnectionConfig:
    """How a client connects to its broker. TLS when `ca` is set (client certificate with `cert`/`key`)."""

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


def role_connection(cfg: ConnectionConfig, role: str) -> ConnectionConfig:
    """`cfg` for a daemon's extra connection `role` (protocol.tls.ROLES): the same broker, with the role's own
    certificate, which `fediomt pki issue` writes beside the main one (ROLE.crt, ROLE.key). The brokers make each
    client id the certificate's CN, so a second connection on the main certificate would take the first's place.
    Unchanged without a client certificate (plain or password connections keep their client ids)."""
    if cfg.cert is None:
        return cfg
    cert, key = role_files(cfg.cert, role)
    if cert == Path(cfg.cert):   # already the role's own certificate (`fediomt push --cert push.crt`)
        return cfg
    if not cert.exists():
        raise FileNotFoundError(f"{cert}: the {role} connection needs its own certificate beside {cfg.cert} "
                                "(`fediomt pki issue` writes it; an older PKI gets it by re-running the issue "
                                "command of this identity)")
    return replace(cfg, cert=cert, key=key)


def new_client(cfg: ConnectionConfig, client_id: str, **options) -> mqtt.Client:
    """A paho 2.x MQTT 5 client with the configured TLS / credentials (not connected yet)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, **options)
    if cfg.ca is not None:
        client.tls_set_context(client_context(cfg.ca, cfg.cert, cfg.key))
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password)
    return client


def connect_properties(cfg: ConnectionConfig) -> Properties:
    """MQTT 5 CONNECT properties: the configured session expiry (how long the broker keeps a session)."""
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
    """One paho client, the only MQTT client code of the tiers (daemons, device agent, OTA, ledger replication).

    `start` makes the first connection, retried with back-off and jitter until it succeeds or `stop` is set; paho
    then reconnects by itself within the same bounds. Every (re)connection subscribes `subscriptions` (QoS 1) and
    then calls `on_connected()`. Messages go either into `inbox` as (conn, topic, payload, mid, qos), acknowledged
    by the consumer with `ack` when `manual_ack` (the daemons ack only what is durable), or to
    `on_message(topic, payload)` on paho's network thread. `will` is a retained QoS 1 last will; a persistent
    session (cfg.session_expiry_s > 0) keeps subscriptions and queued QoS 1 messages across reconnects.
    """

    def __init__(self, cfg: ConnectionConfig, client_id: str, subscriptions: list[str], inbox: queue.Queue | None,
                 log: logging.Logger, manual_ack: bool = True, *,
                 on_message: Callable[[str, bytes], None] | None = None,
                 on_connected: Callable[[], None] | None = None, will: tuple[str, bytes] | None = None) -> None:
        if (inbox is None) == (on_message is None):
            raise ValueError("deliver to exactly one of inbox and on_message")
        self.cfg, self.subscriptions, self.inbox, self.log = cfg, subscriptions, inbox, log
        self._on_connected = on_connected
        self.closing = False                   # set by close(): the disconnect that follows is logged at info
        self.connected = threading.Event()
        self.subscribed = threading.Event()   # the broker granted a subscription (SUBACK)
        client = new_client(cfg, client_id, manual_ack=manual_ack and inbox is not None)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.reconnect_delay_set(min_delay=max(1, round(cfg.reconnect_min_s)),
                                   max_delay=max(1, round(cfg.reconnect_max_s)))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = lambda *_: self.subscribed.set()
        if on_message is not None:
            client.on_message = lambda _c, _u, m: on_message(m.topic, m.payload)
        else:
            client.on_message = lambda _c, _u, m: self.inbox.put((self, m.topic, m.payload, m.mid, m.qos))
        self.client = client

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            event(self.log, "broker refused the connection", logging.WARNING, reason=str(reason_code))
            return
        tcp_nodelay(client)
        self.subscribe(self.subscriptions)
        self.connected.set()
        event(self.log, "connected", host=self.cfg.host, port=self.cfg.port)
        if self._on_connected is not None:
            self._on_connected()

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        self.connected.clear()
        self.subscribed.clear()
        clean = self.closing and not reason_code.is_failure   # our own close(): a clean stop, not a problem
        event(self.log, "disconnected", logging.INFO if clean else logging.WARNING, reason=str(reason_code))

    def start(self, stop: threading.Event | None = None, timeout_s: float | None = None) -> bool:
        """Connect (retrying) and start the network thread; False when `stop` was set or `timeout_s` ran out."""
        stop = stop or threading.Event()
        deadline = time.monotonic() + (math.inf if timeout_s is None else timeout_s)
        props = connect_properties(self.cfg)
        for delay in backoff_delays(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s):
            if stop.is_set() or time.monotonic() >= deadline:
                return False
            try:
                self.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                                    clean_start=self.cfg.session_expiry_s == 0, properties=props)
                break
            except OSError as exc:  # includes ssl.SSLError
                event(self.log, "connect failed, retrying", logging.WARNING, error=str(exc), retry_in_s=round(delay, 2))
                stop.wait(min(delay, max(0.0, deadline - time.monotonic())))
        self.client.loop_start()
        return True

    def subscribe(self, topics: list[str]) -> None:
        """QoS 1; extra subscriptions (OTA chunks) last as long as the session, not across a clean reconnect."""
        if topics:
            self.client.subscribe([(t, SubscribeOptions(qos=1)) for t in topics])

    def unsubscribe(self, topics: list[str] | None = None) -> None:
        """`topics`, or this connection's own subscriptions (a no-op while disconnected)."""
        topics = self.subscriptions if topics is None else topics
        if topics:
            self.client.unsubscribe(topics)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """QoS 1; while disconnected paho queues it and sends it after the reconnect."""
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self.client.ack(mid, qos)

    def close(self, last: tuple[str, bytes] | None = None, timeout_s: float = 5.0) -> None:
        """Publish `last` (retained, if connected), disconnect cleanly (no last will), stop the network thread."""
        if last is not None and self.connected.is_set():
            try:
                self.publish(*last, retain=True).wait_for_publish(timeout_s)
            except (RuntimeError, ValueError):
                pass
        self.closing = True
        self.client.disconnect()
        self.client.loop_stop()
