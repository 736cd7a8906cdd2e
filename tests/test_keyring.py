"""protocol.keyring.KeyRing forgets removed enrolments, refuses revoked certificates and picks up replaced keys
within its check interval, without a restart; a broken key or CRL file never crashes it. The edge checks devices
with it and the cloud checks edges. Real PKI, real keys."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from fediomt import pki
from protocol import signing
from protocol.errors import ProtocolError, Reason
from protocol.keyring import KeyRing

from .harness import Fed, open_round


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ca(tmp_path):
    pki.init_ca(tmp_path / "pki")
    for device in ("d1", "d2"):
        pki.issue(tmp_path / "pki", "device", device)
    pki.enrolment(tmp_path / "pki", tmp_path / "enrol")
    return tmp_path / "pki"


@pytest.fixture
def clock():
    return Clock()


def ring(ca, clock, check_s: float = 5.0) -> KeyRing:
    return KeyRing(ca.parent / "enrol", pki.crl_path(ca), check_s, clock=clock)


def raw(key) -> bytes:
    return signing.public_key_bytes(key)


def enrolled_key(ca, device: str) -> bytes:
    return raw(signing.load_public_key(pki.identity(ca, "device", device).sign_pub))


def refused(keys: KeyRing, device: str) -> Reason | None:
    try:
        keys.get(device)
    except ProtocolError as exc:
        return exc.reason
    return None


def test_enrolled_device_is_accepted_and_a_stranger_is_not(ca, clock):
    keys = ring(ca, clock)
    assert raw(keys.get("d1")) == enrolled_key(ca, "d1")
    assert refused(keys, "zz") == Reason.UNKNOWN_SENDER


def test_removed_enrolment_is_refused_after_the_interval_not_before(ca, clock):
    keys = ring(ca, clock)
    keys.get("d1")
    (ca.parent / "enrol" / "d1.pub").unlink()
    clock.now += 4.9
    assert refused(keys, "d1") is None          # cached until the next check: no file access per update
    clock.now += 0.2
    assert refused(keys, "d1") == Reason.UNKNOWN_SENDER
    assert refused(keys, "d2") is None


def test_revoked_certificate_is_refused_after_the_interval_not_before(ca, clock):
    keys = ring(ca, clock)
    keys.get("d1")
    pki.revoke(ca, "d1")                        # the CRL only; the enrolment directory still holds d1
    clock.now += 4.9
    assert refused(keys, "d1") is None
    clock.now += 0.2
    assert refused(keys, "d1") == Reason.REVOKED
    assert refused(keys, "d2") is None


def test_sighup_expire_revalidates_on_the_next_get(ca, clock):
    keys = ring(ca, clock)
    keys.get("d1")
    pki.revoke(ca, "d1")
    keys.expire()
    assert refused(keys, "d1") == Reason.REVOKED


def test_replaced_key_is_accepted_and_the_old_one_is_not(ca, clock):
    keys = ring(ca, clock)
    old = raw(keys.get("d1"))
    pki.issue(ca, "device", "d1", rotate=True)  # new keys; the old certificate goes on the CRL
    clock.now += 5.1
    assert refused(keys, "d1") == Reason.REVOKED   # enrolment not re-synced yet: the old key is revoked
    pki.enrolment(ca, ca.parent / "enrol")
    clock.now += 5.1
    new = raw(keys.get("d1"))
    assert new == enrolled_key(ca, "d1") != old


def test_broken_files_are_logged_and_the_last_good_state_kept(ca, clock, caplog):
    keys = ring(ca, clock)
    keys.get("d1")
    pki.revoke(ca, "d2")
    clock.now += 5.1
    assert refused(keys, "d2") == Reason.REVOKED
    (ca.parent / "enrol" / "d1.pub").write_text("not a key")
    pki.crl_path(ca).write_text("not a CRL")
    clock.now += 5.1
    with caplog.at_level(logging.ERROR, logger="edge"):
        assert raw(keys.get("d1")) == enrolled_key(ca, "d1")     # the previous key
    assert refused(keys, "d2") == Reason.REVOKED                 # the previous revocations
    messages = [r.getMessage() for r in caplog.records]
    assert "enrolment file unusable, keeping the previous key" in messages
    assert "CRL unusable, keeping the previous revocations" in messages
    os.unlink(pki.crl_path(ca))                                   # a missing CRL is no crash either
    clock.now += 5.1
    assert refused(keys, "d2") == Reason.REVOKED


def test_engine_refuses_a_device_revoked_while_it_runs(tmp_path, clock):
    """EdgeEngine.handle_update: accepted, then `fediomt pki revoke`, then the next update refused (no restart)."""
    ca = tmp_path / "pki"
    pki.init_ca(ca)
    signers = {d: signing.load_private_key(pki.issue(ca, "device", d).sign_key) for d in ("d1", "d2")}
    pki.enrolment(ca, tmp_path / "enrol")
    fed = Fed(tmp_path / "fed", n_devices=0, enrolment_dir=str(tmp_path / "enrol"), crl_file=str(pki.crl_path(ca)),
              rounds={"quorum": 1.0})
    fed.devices = ["d1", "d2"]
    eng = fed.engine()
    eng.keys.clock = clock
    eng.keys.revalidate()                                      # next check: clock.now + key_check_s
    delta = np.ones(fed.n_params, np.float32)
    open_round(fed, eng)
    assert eng.handle_update("d1", fed.update("d1", delta, key=signers["d1"]))[0].accepted
    pki.revoke(ca, "d1")
    clock.now += 5.1
    open_round(fed, eng, round_id=2, version=1)
    ack, _ = eng.handle_update("d1", fed.update("d1", delta, round_id=2, key=signers["d1"]))
    assert (ack.accepted, ack.reason) == (False, Reason.REVOKED)
    assert eng.rejected["REVOKED"] == 1                       # counted like every rejection
    assert eng.handle_update("d2", fed.update("d2", delta, round_id=2, key=signers["d2"]))[0].accepted


def test_cloud_refuses_an_edge_revoked_while_it_runs(tmp_path, clock):
    """The cloud's edge keys come from the same KeyRing: `fediomt pki revoke` of an edge -> its aggregates refused."""
    from cloud.aggregator import CloudAggregator
    from cloud.config import load_config

    ca = tmp_path / "pki"
    pki.init_ca(ca)
    cloud = pki.issue(ca, "cloud")
    for edge in ("edge1", "edge2"):
        pki.issue(ca, "edge", edge)
    pki.enrolment(ca, tmp_path / "edges", kind="edge")
    config = tmp_path / "cloud.toml"
    config.write_text(f'run_dir = "run"\nsigning_key = "{cloud.sign_key}"\nedge_keys_dir = "edges"\n'
                      f'crl_file = "{pki.crl_path(ca)}"\nmodel = "vitals_mlp"\n'
                      '[model_options]\nn_features = 4\nhidden = 4\n')
    agg = CloudAggregator(load_config(config), logging.getLogger("cloud-test"))
    agg.edge_keys.clock = clock
    agg.edge_keys.revalidate()
    expected = raw(signing.load_public_key(pki.identity(ca, "edge", "edge1").sign_pub))
    assert raw(agg.engine.edge_key("edge1")) == expected and agg.edges == ["edge1", "edge2"]
    pki.revoke(ca, "edge1")
    clock.now += 4.9
    assert raw(agg.engine.edge_key("edge1")) == expected               # not before the check interval
    clock.now += 0.2
    with pytest.raises(ProtocolError) as exc:
        agg.engine.edge_key("edge1")
    assert exc.value.reason == Reason.REVOKED
    assert raw(agg.engine.edge_key("edge2")) == raw(signing.load_public_key(pki.identity(ca, "edge", "edge2").sign_pub))
