"""Per-(device, edge) MAC authentication of DeviceUpdates (SECURITY.md "MAC-authenticated updates"): the tag covers
exactly the signed bytes, is checked on the received bytes, and only the key derived for this edge verifies it.
Real PKI, real keys; one device agent end to end through a real Mosquitto to the real edge gateway."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pytest

from device.agent import DeviceAgent
from device.config import load_config as load_device_config
from edge.config import EdgeConfig
from edge.gateway import Gateway
from fediomt import pki
from protocol import signing
from protocol.errors import ProtocolError, Reason
from protocol.keyring import KeyRing
from protocol.messages import (
    Ack,
    DeviceUpdate,
    decode,
    encode,
    mac_message,
    verify_mac_raw,
)
from protocol.mqtt import ConnectionConfig
from protocol.samples import sample_messages

from .harness import Fed, bundle_weights, open_round, provision_device, publish_cloud_round
from .test_keyring import Clock


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


def test_device_agent_with_auth_mac_is_accepted_by_a_real_edge_through_mosquitto(ca, tmp_path, broker, recorder,
                                                                                   daemons):
    """accept_signatures = false at the edge: only the MAC path can accept the agent's update."""
    cloud_key, edge_key = signing.generate_signing_key(), signing.generate_signing_key()
    signing.save_public_key(cloud_key.public_key(), tmp_path / "cloud.pub")
    signing.save_private_key(edge_key, tmp_path / "edge.key")
    pki.enrolment(ca, tmp_path / "enrolment", edge="e1")
    ident = pki.identity(ca, "device", "d1")
    config = provision_device(tmp_path, "d1", broker.port, samples=64, signing_key=str(ident.sign_key), auth="mac",
                              mac_key=str(ident.mac_key), privacy={"epsilon": 100.0})
    (tmp_path / "edge").mkdir()
    gateway = Gateway(EdgeConfig(edge_id="e1", state_dir=tmp_path / "edge", enrolment_dir=tmp_path / "enrolment",
                                 signing_key=tmp_path / "edge.key", cloud_public_key=tmp_path / "cloud.pub",
                                 broker=ConnectionConfig(port=broker.port), accept_signatures=False),
                      logging.getLogger("test.edge"))
    agent = DeviceAgent(load_device_config(config), logging.getLogger("test.device"))
    observer = recorder(["fl/e1/updates/d1", "fl/e1/ack/d1"], client_id="observer")
    daemons.thread(gateway)
    daemons.thread(agent)
    publish_cloud_round(observer, cloud_key, bundle_weights())
    observer.wait(lambda _: observer.payloads("fl/e1/ack/d1"), 60, "d1's Ack")
    seen = dict(observer.messages)                                    # the last of each topic
    assert len(decode(seen["fl/e1/updates/d1"], expect=DeviceUpdate).sig) == 32
    ack = decode(seen["fl/e1/ack/d1"], expect=Ack)
    assert ack.accepted and ack.reason == Reason.OK, ack
