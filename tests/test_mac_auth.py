"""Per-(device, edge) MAC authentication of DeviceUpdates (SECURITY.md "MAC-authenticated updates"): the tag covers
exactly the signed bytes, is checked on the received bytes, and only the key derived for this edge verifies it.
Real PKI, real keys; one device agent end to end through a real Mosquitto to the real edge gateway."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from device.agent import DeviceAgent
from device.config import load_config as load_device_config
from device.runtime import TrainableModel
from device.sandbox import provision
from edge.config import EdgeConfig
from edge.gateway import Gateway
from fediomt import pki
from protocol import signing
from protocol.bundle import load_bundle
from protocol.errors import ProtocolError, Reason
from protocol.keyring import KeyRing
from protocol.messages import (
    Ack,
    DeviceUpdate,
    GlobalModel,
    RoundAnnouncement,
    TrainingPlan,
    decode,
    encode,
    floats_to_bytes,
    mac_message,
    sign_message,
    verify_mac_raw,
)
from protocol.mqtt import ConnectionConfig
from protocol.samples import sample_messages

from .conftest import REPO
from .harness import Fed, open_round
from .test_keyring import Clock

PREBUILT = REPO / "firmware_models" / "prebuilt"


@pytest.fixture
def ca(tmp_path):
    pki.init_ca(tmp_path / "pki")
    for device in ("d1", "d2"):
        pki.issue(tmp_path / "pki", "device", device)
    return tmp_path / "pki"


def master(ca, device: str = "d1") -> bytes:
    return signing.load_mac_key(pki.identity(ca, "device", device).mac_key)


def update() -> DeviceUpdate:
    return next(m for m in sample_messages() if isinstance(m, DeviceUpdate))


def rejected(data: bytes, key: bytes) -> bool:
    """True when the strict decoder refuses `data` or the tag does not verify on it (BAD_SIGNATURE)."""
    try:
        msg = decode(data, expect=DeviceUpdate)
    except ProtocolError:
        return True
    try:
        verify_mac_raw(data, msg, key)
    except ProtocolError as exc:
        assert exc.reason == Reason.BAD_SIGNATURE
        return True
    return False


def test_mac_round_trip_and_every_forgery_is_rejected(ca):
    key = signing.derive_mac_key(master(ca), "d1", "edge1")
    data = encode(mac_message(update(), key))
    assert len(decode(data, expect=DeviceUpdate).sig) == 32 and data[-34:-32] == b"\x58\x20"
    assert not rejected(data, key)
    for i in range(len(data)):          # a flipped byte anywhere: undecodable, or decodes and fails the tag
        assert rejected(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:], key), i
    msg = decode(data, expect=DeviceUpdate)
    truncated = dataclasses.replace(msg, sig=msg.sig[:31])
    assert rejected(encode(truncated), key)
    assert rejected(encode(mac_message(update(), signing.derive_mac_key(master(ca), "d1", "edge2"))), key)
    assert rejected(encode(mac_message(update(), master(ca))), key)


def test_derived_key_differs_per_edge_and_device_and_never_is_the_master(ca):
    keys = {signing.derive_mac_key(master(ca, d), d, e) for d in ("d1", "d2") for e in ("edge1", "edge2")}
    assert len(keys) == 4 and master(ca) not in keys and master(ca, "d2") not in keys
    assert signing.derive_mac_key(master(ca), "d1", "edge1") == signing.derive_mac_key(master(ca), "d1", "edge1")


def test_pki_mac_files_are_0600_and_only_derived_keys_reach_the_edge(ca, tmp_path):
    ident = pki.identity(ca, "device", "d1")
    assert all(os.stat(p).st_mode & 0o777 == 0o600 for p in (ident.mac_key, ident.sign_key, ident.key))
    assert pki.enrolment(ca, tmp_path / "plain") == ["d1", "d2"]
    assert not list((tmp_path / "plain").glob("*.mac"))           # without --edge: as before
    pki.enrolment(ca, tmp_path / "enrol", edge="edge1")
    mac_file = tmp_path / "enrol" / "d1.mac"
    assert os.stat(mac_file).st_mode & 0o777 == 0o600
    assert mac_file.read_bytes() == signing.derive_mac_key(master(ca), "d1", "edge1")
    pki.revoke(ca, "d2")
    pki.enrolment(ca, tmp_path / "enrol", edge="edge1")
    assert sorted(p.name for p in (tmp_path / "enrol").iterdir()) == ["d1.crt", "d1.mac", "d1.pub"]


def mac_fed(ca, tmp_path, **overrides) -> Fed:
    fed = Fed(tmp_path, n_devices=0, **overrides)
    pki.enrolment(ca, tmp_path / "enrolment", edge="edge1")
    fed.keys = {d: signing.load_private_key(pki.identity(ca, "device", d).sign_key) for d in ("d1", "d2")}
    return fed


def tagged(fed: Fed, device: str, key: bytes) -> bytes:
    signed = decode(fed.update(device, np.ones(fed.n_params, np.float32)), expect=DeviceUpdate)
    return encode(mac_message(signed, key))


def test_edge_accepts_a_mac_for_itself_and_refuses_one_for_another_edge(ca, tmp_path):
    fed = mac_fed(ca, tmp_path)
    engine = fed.engine()
    open_round(fed, engine)
    ack, _ = engine.handle_update("d2", tagged(fed, "d2", signing.derive_mac_key(master(ca, "d2"), "d2", "edge2")))
    assert not ack.accepted and ack.reason == Reason.BAD_SIGNATURE
    ack, _ = engine.handle_update("d1", tagged(fed, "d1", signing.derive_mac_key(master(ca), "d1", "edge1")))
    assert ack.accepted, ack
    ack, _ = engine.handle_update("d2", fed.update("d2", np.ones(fed.n_params, np.float32)))
    assert ack.accepted, ack                       # signatures still accepted by default
    engine.close()


def test_accept_signatures_false_refuses_a_signed_update_from_a_mac_enrolled_device(ca, tmp_path):
    fed = mac_fed(ca, tmp_path, accept_signatures=False)
    (tmp_path / "enrolment" / "d2.mac").unlink()   # d2: signatures only
    engine = fed.engine()
    open_round(fed, engine)
    ack, _ = engine.handle_update("d1", fed.update("d1", np.ones(fed.n_params, np.float32)))
    assert not ack.accepted and ack.reason == Reason.BAD_SIGNATURE and "must use it" in ack.detail
    ack, _ = engine.handle_update("d2", tagged(fed, "d2", signing.derive_mac_key(master(ca, "d2"), "d2", "edge1")))
    assert not ack.accepted and "no MAC key" in ack.detail
    ack, _ = engine.handle_update("d2", fed.update("d2", np.ones(fed.n_params, np.float32)))
    assert ack.accepted, ack
    engine.close()


def test_removed_mac_file_is_forgotten_after_the_check_interval(ca, tmp_path):
    pki.enrolment(ca, tmp_path / "enrol", edge="edge1")
    clock = Clock()
    keys = KeyRing(tmp_path / "enrol", pki.crl_path(ca), 5.0, clock=clock)
    assert keys.entry("d1").mac == signing.derive_mac_key(master(ca), "d1", "edge1")
    (tmp_path / "enrol" / "d1.mac").unlink()
    clock.now += 4.9
    assert keys.entry("d1").mac is not None
    clock.now += 0.2
    assert keys.entry("d1").mac is None and keys.entry("d1").key is not None


def test_device_agent_with_auth_mac_is_accepted_by_a_real_edge_through_mosquitto(ca, tmp_path, broker):
    """accept_signatures = false at the edge: only the MAC path can accept the agent's update."""
    cloud_key, edge_key = signing.generate_signing_key(), signing.generate_signing_key()
    signing.save_public_key(cloud_key.public_key(), tmp_path / "cloud.pub")
    signing.save_private_key(edge_key, tmp_path / "edge.key")
    pki.enrolment(ca, tmp_path / "enrolment", edge="e1")
    ident = pki.identity(ca, "device", "d1")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 100, 6)).astype(np.float32), rng.integers(0, 7, 64)
    config = provision(tmp_path / "d1", "d1", "e1", PREBUILT / "wearable_cnn",
                       PREBUILT / "DEVELOPMENT_ONLY_signing.key.pub", tmp_path / "cloud.pub", x, y, broker.port,
                       signing_key=str(ident.sign_key), auth="mac", mac_key=str(ident.mac_key),
                       privacy={"epsilon": 100.0})
    (tmp_path / "edge").mkdir()
    gateway = Gateway(EdgeConfig(edge_id="e1", state_dir=tmp_path / "edge", enrolment_dir=tmp_path / "enrolment",
                                 signing_key=tmp_path / "edge.key", cloud_public_key=tmp_path / "cloud.pub",
                                 broker=ConnectionConfig(port=broker.port), accept_signatures=False),
                      logging.getLogger("test.edge"))
    agent = DeviceAgent(load_device_config(config), logging.getLogger("test.device"))
    seen: dict[str, bytes] = {}
    got = threading.Event()

    def on_message(_c, _u, msg) -> None:
        seen[msg.topic] = msg.payload
        got.set() if msg.topic == "fl/e1/ack/d1" else None

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="observer", protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.connect("127.0.0.1", broker.port)
    client.subscribe([("fl/e1/updates/d1", 1), ("fl/e1/ack/d1", 1)])
    client.loop_start()
    threads = [threading.Thread(target=t.run, daemon=True) for t in (gateway, agent)]
    for t in threads:
        t.start()
    try:
        bundle = load_bundle(PREBUILT / "wearable_cnn", signing.load_public_key(
            PREBUILT / "DEVELOPMENT_ONLY_signing.key.pub"))
        weights = floats_to_bytes(TrainableModel(bundle.model_bytes, bundle.manifest).get_flat())
        model = GlobalModel("wearable_cnn", 1, "full", None, len(weights) // 4, weights,
                            hashlib.sha256(weights).digest())
        ann = RoundAnnouncement(1, "wearable_cnn", 1, "fedavg", time.time() + 120,
                                TrainingPlan(0.05, 1, 32, 1.0, 1.1), {}, edges=["e1"])
        client.publish("fl/cloud/model", encode(sign_message(model, cloud_key)), qos=1, retain=True)
        client.publish("fl/cloud/round", encode(sign_message(ann, cloud_key)), qos=1, retain=True)
        assert got.wait(60), sorted(seen)
    finally:
        agent.stop.set()
        gateway.stop.set()
        for t in threads:
            t.join(15)
        client.disconnect()
        client.loop_stop()
    assert len(decode(seen["fl/e1/updates/d1"], expect=DeviceUpdate).sig) == 32
    ack = decode(seen["fl/e1/ack/d1"], expect=Ack)
    assert ack.accepted and ack.reason == Reason.OK, ack
