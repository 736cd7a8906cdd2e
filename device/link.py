"""The device's MQTT link: paho-mqtt 2.x, MQTT 5, persistent session, last will, TLS, back-off with jitter.

The session is persistent (clean_start=False + session expiry): QoS 1 messages for this device are queued by the
broker while it is offline, and paho re-sends our unacknowledged QoS 1 publishes after a reconnect (a publish made
while disconnected is queued too). paho's own reconnect (reconnect_delay_set: doubling between the configured
bounds) runs after the first connection; the first connection is our loop, with jitter so that a ward of devices
rebooting together does not hammer the broker in lock-step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from device.config import BrokerConfig
from protocol.logs import event
from protocol.mqtt import backoff_delays, connect_properties, new_client, tcp_nodelay


class Link:
    """One MQTT connection for one device. `on_message(topic, payload)` runs on paho's network thread."""

    def __init__(self, cfg: BrokerConfig, client_id: str, subscriptions: list[str], will: tuple[str, bytes],
                 on_message: Callable[[str, bytes], None], on_connected: Callable[[], None],
                 log: logging.Logger) -> None:
        self.cfg, self.subscriptions, self.log = cfg, subscriptions, log
        self._on_message, self._on_connected = on_message, on_connected
        self.connected = threading.Event()
        client = new_client(cfg, client_id)
        client.will_set(will[0], will[1], qos=1, retain=True)
        client.reconnect_delay_set(min_delay=max(1, round(cfg.reconnect_min_s)),
                                   max_delay=max(1, round(cfg.reconnect_max_s)))
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_message = lambda _c, _u, msg: self._on_message(msg.topic, msg.payload)
        self.client = client

    def _connected(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            event(self.log, "broker refused the connection", logging.WARNING, reason=str(reason_code))
            return
        tcp_nodelay(client)
        client.subscribe([(topic, SubscribeOptions(qos=1)) for topic in self.subscriptions])
        self.connected.set()
        event(self.log, "connected", host=self.cfg.host, port=self.cfg.port)
        self._on_connected()

    def _disconnected(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        self.connected.clear()
        event(self.log, "disconnected", logging.WARNING, reason=str(reason_code))

    def connect(self, stop: threading.Event) -> bool:
        """First connection, retried with back-off and jitter until it succeeds (True) or `stop` is set."""
        props = connect_properties(self.cfg)
        for delay in backoff_delays(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s):
            if stop.is_set():
                return False
            try:
                self.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive, clean_start=False,
                                    properties=props)
                break
            except OSError as exc:  # includes ssl.SSLError
                event(self.log, "connect failed, retrying", logging.WARNING, error=str(exc), retry_in_s=round(delay, 2))
                stop.wait(delay)
        self.client.loop_start()
        return True

    def subscribe(self, topics: list[str]) -> None:
        """Extra subscriptions (OTA chunks); the persistent session keeps them across reconnects."""
        if topics:
            self.client.subscribe([(topic, SubscribeOptions(qos=1)) for topic in topics])

    def unsubscribe(self, topics: list[str]) -> None:
        if topics:
            self.client.unsubscribe(topics)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """QoS 1; while disconnected paho queues it and sends it after the reconnect."""
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def close(self, last: tuple[str, bytes] | None = None, timeout_s: float = 5.0) -> None:
        """Publish `last` (if connected), disconnect cleanly (no last will), stop the network thread."""
        if last is not None and self.connected.is_set():
            info = self.publish(*last, retain=True)
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
