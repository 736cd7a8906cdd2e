"""The written schema (docs/protocol.cddl) and the code agree; every message round-trips; decoders are strict."""

from __future__ import annotations

import dataclasses
import re

import cbor2
import pycddl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import messages as m
from protocol.codec import registry
from protocol.errors import ProtocolError, Reason
from protocol.samples import sample_messages
from protocol.signing import generate_signing_key

from .conftest import REPO

CDDL = (REPO / "docs" / "protocol.cddl").read_text()
SAMPLES = {type(s).KIND: s for s in sample_messages()}


def rule(kind: str) -> str:
    return kind.replace(".", "-")


def schema_for(kind: str) -> pycddl.Schema:
    return pycddl.Schema(f"root = {rule(kind)}\n{CDDL}")


def test_every_registered_kind_has_a_sample_and_a_rule():
    for kind in registry():
        assert kind in SAMPLES, f"add a sample of {kind!r} to protocol/samples.py"
        assert re.search(rf"^{re.escape(rule(kind))} = ", CDDL, re.M), f"add a rule for {kind!r} to protocol.cddl"
        union = re.search(r"^message = (.*?)\n\n", CDDL, re.M | re.S).group(1)
        assert rule(kind) in re.split(r"[\s/]+", union), f"list {rule(kind)!r} in the `message` rule"


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_sample_validates_against_cddl_and_round_trips(kind):
    msg = SAMPLES[kind]
    data = m.encode(msg)
    schema_for(kind).validate_cbor(data)
    pycddl.Schema(f"root = message\n{CDDL}").validate_cbor(data)
    assert m.decode(data) == msg
    assert m.decode(data, expect=type(msg)) == msg


def test_cddl_rejects_what_the_decoder_rejects():
    """The validator is independent: a wrong type fails both the schema and the decoder."""
    wire = cbor2.loads(m.encode(SAMPLES["update"]))
    wire["round_id"] = "three"
    bad = cbor2.dumps(wire, canonical=True)
    with pytest.raises(pycddl.ValidationError):
        schema_for("update").validate_cbor(bad)
    with pytest.raises(ProtocolError) as exc:
        m.decode(bad)
    assert exc.value.reason == Reason.WRONG_TYPE


def test_signature_covers_every_field():
    key = generate_signing_key()
    msg = m.sign_message(SAMPLES["update"], key)
    m.verify_message(msg, key.public_key())
    tampered = dataclasses.replace(msg, num_samples=msg.num_samples + 1)
    with pytest.raises(ProtocolError) as exc:
        m.verify_message(tampered, key.public_key())
    assert exc.value.reason == Reason.BAD_SIGNATURE
    with pytest.raises(ProtocolError):
        m.verify_message(msg, generate_signing_key().public_key())


def _mutate(kind: str, **changes) -> bytes:
    wire = cbor2.loads(m.encode(SAMPLES[kind]))
    for key, value in changes.items():
        if value is KeyError:
            del wire[key]
        else:
            wire[key] = value
    return cbor2.dumps(wire)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", Reason.MALFORMED),
    (b"\xff", Reason.MALFORMED),
    (cbor2.dumps([1, 2]), Reason.MALFORMED),
    (cbor2.dumps({"t": "nope", "v": 1}), Reason.WRONG_TYPE),
    (_mutate("ack", v=2), Reason.UNKNOWN_VERSION),
    (_mutate("ack", accepted=1), Reason.WRONG_TYPE),
    (_mutate("ack", round_id=True), Reason.WRONG_TYPE),
    (_mutate("ack", extra=1), Reason.MALFORMED),
    (_mutate("ack", detail=KeyError), Reason.MALFORMED),
    (_mutate("ack", device_id="x" * 65), Reason.TOO_LARGE),
    (_mutate("ack", round_id=-1), Reason.BAD_VALUE),
    (_mutate("ack", round_id=2**70), Reason.BAD_VALUE),
    (_mutate("update", train_loss=float("nan")), Reason.NON_FINITE),
    (_mutate("update", timestamp=float("inf")), Reason.NON_FINITE),
    (_mutate("update", nonce=b"short"), Reason.MALFORMED),
    (_mutate("chunk", index=5), Reason.BAD_VALUE),
    (_mutate("model", encoding="zip"), Reason.BAD_VALUE),
    (m.encode(SAMPLES["ack"]) + b"\x00", Reason.MALFORMED),
    (cbor2.dumps(cbor2.CBORTag(1, 0)), Reason.MALFORMED),
])
def test_hostile_inputs_raise_one_typed_error(data, reason):
    with pytest.raises(ProtocolError) as exc:
        m.decode(data)
    assert exc.value.reason == reason


def test_size_limit_checked_before_parsing():
    with pytest.raises(ProtocolError) as exc:
        m.decode(b"\x00" * 101, max_bytes=100)
    assert exc.value.reason == Reason.TOO_LARGE


def test_expect_restricts_the_kind():
    with pytest.raises(ProtocolError) as exc:
        m.decode(m.encode(SAMPLES["ack"]), expect=m.DeviceUpdate)
    assert exc.value.reason == Reason.WRONG_TYPE


def test_huge_declared_lengths_do_not_allocate():
    # an array header claiming 2**60 items and a byte string claiming 2**40 bytes, with no content
    for data in (b"\x9b" + (2**60).to_bytes(8, "big"), b"\x5b" + (2**40).to_bytes(8, "big")):
        with pytest.raises(ProtocolError):
            m.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_protocol_error(data):
    try:
        m.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_mutated_samples_only_ever_raise_protocol_error(kind, data):
    raw = bytearray(m.encode(SAMPLES[kind]))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        m.decode(bytes(raw))
    except ProtocolError:
        pass


def test_dense_weights_strict():
    import numpy as np

    vec = np.array([1.0, -2.0], np.float32)
    assert (m.bytes_to_floats(m.floats_to_bytes(vec), 2) == vec).all()
    with pytest.raises(ProtocolError):
        m.bytes_to_floats(m.floats_to_bytes(vec), 3)
    with pytest.raises(ProtocolError):
        m.bytes_to_floats(m.floats_to_bytes(np.array([np.nan, 1], np.float32)), 2)
