"""Provision a device directory and script its edge: tooling for tests, `fediomt bench device` and the local demo
(not device-tier code: it lives with the other harnesses in experiments).

`provision` writes what a real device holds (signing key, installed bundle, local data, device.toml);
`ScriptedCloud` plays the cloud and the edge on `fl/{edge}/...` over the one MQTT client layer
(protocol.mqtt.Connection): it publishes signed global models and round announcements (retained, as the edge relays
them) and collects what devices send.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time
from pathlib import Path

import numpy as np
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.model import compress_broadcast
from device.flash import flash_local
from protocol import topics
from protocol.bundle import load_bundle
from protocol.compression import CompressionSettings
from protocol.global_model import in_full
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
    global_model,
    sign_message,
)
from protocol.mqtt import Connection, ConnectionConfig
from protocol.signing import generate_signing_key, load_public_key, save_private_key, save_public_key

DENSE32 = CompressionSettings(method="dense", bits=32)  # a delta global model: exact float32 differences


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
                 client_id: str = "scripted-cloud", tls: tuple[Path, Path, Path] | None = None,
                 timeout_s: float = 30.0) -> None:
        """`tls`: (ca, cert, key) to connect with a client certificate (an mTLS broker; CN = client_id). A
        persistent session: updates sent while we reconnect are queued by the broker."""
        self.edge, self.key = edge, cloud_key
        self.updates: queue.Queue[tuple[DeviceUpdate, int]] = queue.Queue()
        self.statuses: queue.Queue[DeviceStatus] = queue.Queue()
        self.bytes_down = 0  # payload bytes devices receive from us (models, rounds, acks), per subscriber
        self.bytes_up = 0    # payload bytes devices sent us (updates, statuses)
        ca, cert, key = tls if tls is not None else (None, None, None)
        cfg = ConnectionConfig(host=host, port=port, ca=ca, cert=cert, key=key, session_expiry_s=3600,
                               reconnect_min_s=0.2, reconnect_max_s=2.0)
        self.conn = Connection(cfg, client_id, [topics.update_topic(edge, topics.ANY),
                                                topics.status_topic(edge, topics.ANY)],
                               None, logging.getLogger("scripted-cloud"), on_message=self._message)
        if not self.conn.start(timeout_s=timeout_s):
            raise ConnectionError(f"scripted cloud: no broker at {host}:{port} within {timeout_s} s")

    def _message(self, topic: str, payload: bytes) -> None:
        self.bytes_up += len(payload)
        if "/updates/" in topic:
            self.updates.put((decode(payload, expect=DeviceUpdate), len(payload)))
        elif payload:
            self.statuses.put(decode(payload, expect=DeviceStatus))

    def _publish(self, topic: str, data: bytes, retain: bool = True) -> None:
        self.conn.publish(topic, data, retain=retain).wait_for_publish(10)
        self.bytes_down += len(data)

    def publish_model(self, name: str, version: int, weights: np.ndarray, control: np.ndarray | None = None,
                      tamper: bool = False, base: np.ndarray | None = None) -> GlobalModel:
        """A signed global model: full float32, or (with `base`, version - 1's weights) a dense delta against it
        (the cloud's own delta path, cloud.model.compress_broadcast). `tamper` flips a weight AFTER signing
        (devices must refuse it)."""
        weights, delta = np.asarray(weights, np.float32), None
        if base is not None:
            delta, weights, _ = compress_broadcast(np.asarray(base, np.float32), weights, None, DENSE32)
        msg = sign_message(global_model(name, version, weights, delta, control), self.key)
        if tamper:
            bad = weights.copy()
            bad[0] += 1.0
            msg = dataclasses.replace(msg, weights=floats_to_bytes(bad))
        self._publish(topics.model_topic(self.edge), encode(msg))
        return msg

    def publish_full(self, msg: GlobalModel, weights: np.ndarray) -> None:
        """What the edge keeps retained for devices that missed a version: `msg` (a model this cloud published) in
        full with `weights`, unsigned (protocol.global_model.in_full)."""
        self._publish(topics.model_full_topic(self.edge), encode(in_full(msg, np.asarray(weights, np.float32))))

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
        self.conn.close()
