"""Provision a device directory and script its edge: for tests, `fediomt bench device` and the local demo.

`provision` writes what a real device holds (signing key, installed bundle, local data, device.toml);
`ScriptedCloud` is a plain paho client that plays the cloud and the edge on `fl/{edge}/...`: it publishes signed
global models and round announcements (retained, as the edge relays them) and collects what devices send.
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.flash import flash_local
from protocol import topics
from protocol.bundle import load_bundle
from protocol.compression import CompressionSettings, decode_update, encode_update
from protocol.messages import (
    Ack,
    DeviceStatus,
    DeviceUpdate,
    GlobalModel,
    RoundAnnouncement,
    TrainingPlan,
    decode,
    encode,
    floats_to_bytes,
    sign_message,
)
from protocol.signing import generate_signing_key, load_public_key, save_private_key, save_public_key


def provision(root: str | Path, device_id: str, edge: str, bundle_src: str | Path, bundle_pubkey: str | Path,
              cloud_pubkey: str | Path, x: np.ndarray, y: np.ndarray, broker_port: int,
              broker_host: str = "127.0.0.1", **overrides) -> Path:
    """Write a device directory under `root` and return its device.toml. `overrides` are config keys or tables
    (dicts are merged into the table of the same name)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = generate_signing_key()
    save_private_key(key, root / "signing.key")
    save_public_key(key.public_key(), root / f"{device_id}.pub")
    bundle_key = load_public_key(bundle_pubkey)
    flash_local(load_bundle(bundle_src, bundle_key), root / "bundles", bundle_key)
    (root / "data").mkdir(exist_ok=True)
    np.savez(root / "data" / "train.npz", x=np.asarray(x, np.float32), y=np.asarray(y, np.int64))
    config = {"id": device_id, "edge": edge, "state_dir": "state", "bundle_dir": "bundles",
              "bundle_pubkey": str(Path(bundle_pubkey).resolve()), "cloud_pubkey": str(Path(cloud_pubkey).resolve()),
              "signing_key": "signing.key", "data": {"dir": "data"},
              "broker": {"host": broker_host, "port": broker_port, "reconnect_min_s": 0.2, "reconnect_max_s": 2.0}}
    for name, value in overrides.items():
        config[name] = {**config.get(name, {}), **value} if isinstance(value, dict) else value
    path = root / "device.toml"
    path.write_bytes(tomli_w.dumps(config).encode())
    return path


class ScriptedCloud:
    """The cloud + edge of one edge id, scripted: publish signed models/rounds, collect updates and statuses."""

    def __init__(self, port: int, edge: str, cloud_key: Ed25519PrivateKey, host: str = "127.0.0.1",
                 client_id: str = "scripted-cloud", tls: tuple[Path, Path, Path] | None = None) -> None:
        """`tls`: (ca, cert, key) to connect with a client certificate (an mTLS broker; CN = client_id)."""
        self.edge, self.key = edge, cloud_key
        self.updates: queue.Queue[tuple[DeviceUpdate, int]] = queue.Queue()
        self.statuses: queue.Queue[DeviceStatus] = queue.Queue()
        self.bytes_down = 0  # payload bytes devices receive from us (models, rounds, acks), per subscriber
        self.bytes_up = 0    # payload bytes devices sent us (updates, statuses)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        client.on_message = self._message
        watched = [(topics.update_topic(edge, topics.ANY), 1), (topics.status_topic(edge, topics.ANY), 1)]
        client.on_connect = lambda c, *_: c.subscribe(watched)
        client.reconnect_delay_set(1, 2)
        if tls is not None:
            client.tls_set(ca_certs=str(tls[0]), certfile=str(tls[1]), keyfile=str(tls[2]))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # a persistent session: updates sent while we reconnect are queued
        client.connect(host, port, clean_start=False, properties=props)
        client.loop_start()
        self.client = client

    def _message(self, _client, _userdata, msg) -> None:
        self.bytes_up += len(msg.payload)
        if "/updates/" in msg.topic:
            self.updates.put((decode(msg.payload, expect=DeviceUpdate), len(msg.payload)))
        elif msg.payload:
            self.statuses.put(decode(msg.payload, expect=DeviceStatus))

    def _publish(self, topic: str, data: bytes, retain: bool = True) -> None:
        self.client.publish(topic, data, qos=1, retain=retain).wait_for_publish(10)
        self.bytes_down += len(data)

    def publish_model(self, name: str, version: int, weights: np.ndarray, control: np.ndarray | None = None,
                      tamper: bool = False, base: np.ndarray | None = None) -> GlobalModel:
        """A signed global model: full float32, or (with `base`, version - 1's weights) a dense delta against it.
        `tamper` flips a weight AFTER signing (devices must refuse it)."""
        weights = np.asarray(weights, np.float32)
        body, base_version = floats_to_bytes(weights), None
        if base is not None:
            body, _ = encode_update((weights - base).astype(np.float32), CompressionSettings(method="dense", bits=32))
            weights, base_version = (base + decode_update(body, len(base))).astype(np.float32), version - 1
        raw = floats_to_bytes(weights)
        msg = sign_message(GlobalModel(model_name=name, model_version=version, encoding="full" if base is None
                                       else "delta", base_version=base_version, n_params=len(weights), weights=body,
                                       sha256=hashlib.sha256(raw).digest(),
                                       control=None if control is None else floats_to_bytes(control)), self.key)
        if tamper:
            bad = weights.copy()
            bad[0] += 1.0
            msg = dataclasses.replace(msg, weights=floats_to_bytes(bad))
        self._publish(topics.model_topic(self.edge), encode(msg))
        return msg

    def announce(self, round_id: int, name: str, version: int, plan: TrainingPlan, deadline_s: float = 60.0,
                 compression: dict | None = None, cohort: list[str] | None = None) -> RoundAnnouncement:
        msg = sign_message(RoundAnnouncement(
            round_id=round_id, model_name=name, model_version=version, strategy="fedavg",
            deadline=time.time() + deadline_s, plan=plan, compression=compression or {}, edges=[self.edge],
            cohort=cohort or []), self.key)
        self._publish(topics.round_topic(self.edge), encode(msg))
        return msg

    def ack(self, update: DeviceUpdate, accepted: bool = True) -> None:
        msg = Ack(sender=self.edge, device_id=update.device_id, round_id=update.round_id, accepted=accepted, reason=0)
        self._publish(topics.ack_topic(self.edge, update.device_id), encode(msg), retain=False)

    def next_update(self, timeout: float = 30.0) -> tuple[DeviceUpdate, int]:
        """(update, its size on the wire in bytes)."""
        return self.updates.get(timeout=timeout)

    def wait_status(self, state: str, timeout: float = 30.0) -> DeviceStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.statuses.get(timeout=max(0.01, deadline - time.monotonic()))
            if status.state == state:
                return status

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
