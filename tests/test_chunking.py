"""Chunked transfers: split to a broker's cap, reassemble under reordering/duplicates, verify, expire, bound memory."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random

import pytest

from protocol import messages
from protocol.chunking import PART_OVERHEAD, Reassembler, chunk_data_size, split_payload
from protocol.errors import ProtocolError, Reason

TID = b"t" * 16


def _reason(fn, *args, **kw) -> Reason:
    with pytest.raises(ProtocolError) as e:
        fn(*args, **kw)
    return e.value.reason


@pytest.mark.parametrize("cap", [64 * 1024, 128 * 1024, 1024])
def test_every_encoded_chunk_fits_the_broker_cap(cap):
    payload = os.urandom(300_000)
    chunks = split_payload(payload, chunk_data_size(cap), TID)
    assert all(len(messages.encode(c)) <= cap for c in chunks)
    assert all(len(c.data) == chunk_data_size(cap) for c in chunks[:-1]) and b"".join(c.data for c in chunks) == payload
    assert {c.total for c in chunks} == {len(chunks)} and chunks[0].sha256 == hashlib.sha256(payload).digest()


def test_reassembly_over_the_wire_tolerates_reordering_and_duplicates():
    payload = os.urandom(50_000)
    wire = [messages.encode(c) for c in split_payload(payload, 4096, TID)]
    wire = wire + random.Random(1).sample(wire, 5)
    random.Random(2).shuffle(wire)
    r = Reassembler(timeout_s=10, max_total_bytes=1 << 20, max_transfers=4)
    results = [r.add(messages.decode(w, expect=messages.Chunk), now=0.0) for w in wire]
    done = [x for x in results if x is not None]
    assert done == [payload]
    assert r.open_transfers == 0 and r.buffered_bytes == 0
    # Late duplicates of a finished transfer (retained chunks replayed) do not reopen it.
    assert r.add(messages.decode(wire[0]), now=1.0) is None and r.open_transfers == 0


def test_empty_payload_is_one_empty_chunk():
    (chunk,) = split_payload(b"", 100, TID)
    assert Reassembler().add(chunk) == b""


def test_tampered_chunks_are_refused():
    payload = os.urandom(1000)
    chunks = split_payload(payload, 300, TID)
    r = Reassembler(timeout_s=10, max_total_bytes=1 << 16)
    r.add(chunks[0], now=0)
    # Flip every bit of the first byte: a random payload may already start with any fixed byte.
    conflicting = dataclasses.replace(chunks[0], data=bytes([chunks[0].data[0] ^ 0xFF]) + chunks[0].data[1:])
    assert _reason(r.add, conflicting, now=0) == Reason.MALFORMED
    assert _reason(r.add, dataclasses.replace(chunks[1], total_size=999), now=0) == Reason.MALFORMED
    r.add(chunks[1], now=0)
    r.add(chunks[2], now=0)
    forged = dataclasses.replace(chunks[3], data=bytes(len(chunks[3].data)))
    assert _reason(r.add, forged, now=0) == Reason.BAD_HASH
    assert r.open_transfers == 0 and r.buffered_bytes == 0
    # A clean resend with the same id succeeds: a failed transfer is not remembered as finished.
    assert [r.add(c, now=1) for c in chunks][-1] == payload


@pytest.mark.parametrize("field,value,reason", [
    ("total_size", 10, Reason.BAD_SHAPE),        # more data than announced
    ("total", 5000, Reason.BAD_SHAPE),           # more parts than bytes
    ("total_size", 1 << 30, Reason.TOO_LARGE),   # over the reassembler's budget
    ("transfer_id", b"short", Reason.MALFORMED),
    ("sha256", b"x", Reason.MALFORMED),
    ("data", b"", Reason.BAD_SHAPE),
])
def test_inconsistent_chunks_are_refused(field, value, reason):
    chunk = split_payload(os.urandom(1000), 300, TID)[0]
    bad = dataclasses.replace(chunk, **{field: value})
    assert _reason(Reassembler(max_total_bytes=1 << 20).add, bad) == reason


def test_incomplete_sets_time_out_from_their_first_chunk():
    a, b = split_payload(os.urandom(900), 300, TID), split_payload(os.urandom(900), 300, b"u" * 16)
    r = Reassembler(timeout_s=30, max_total_bytes=1 << 16)
    r.add(a[0], now=0)
    r.add(b[0], now=20)
    r.add(a[1], now=29)          # activity does not extend the deadline
    assert r.expire(now=29.9) == []
    assert r.expire(now=30) == [TID]
    assert r.open_transfers == 1 and r.buffered_bytes == 300 + PART_OVERHEAD
    assert r.expire(now=50) == [b"u" * 16] and r.buffered_bytes == 0
    assert r.add(a[2], now=51) is None and r.open_transfers == 1   # starts over


def test_memory_is_bounded_by_transfers_bytes_and_parts():
    r = Reassembler(timeout_s=60, max_total_bytes=10_000, max_transfers=2)
    r.add(split_payload(os.urandom(100), 10, b"a" * 16)[0], now=0)
    r.add(split_payload(os.urandom(100), 10, b"b" * 16)[0], now=0)
    assert _reason(r.add, split_payload(os.urandom(100), 10, b"c" * 16)[0], now=0) == Reason.TOO_LARGE
    # After the others expire there is room again.
    assert r.add(split_payload(os.urandom(100), 10, b"c" * 16)[0], now=61) is None
    # A flood of one-byte chunks is charged its per-part overhead, so it stops long before 10,000 parts.
    flood = split_payload(os.urandom(9000), 1, b"f" * 16)
    r = Reassembler(timeout_s=60, max_total_bytes=10_000, max_transfers=2)
    accepted = 0
    with pytest.raises(ProtocolError) as e:
        for c in flood:
            r.add(c, now=0)
            accepted += 1
    assert e.value.reason == Reason.TOO_LARGE and accepted == 10_000 // (1 + PART_OVERHEAD)
    assert r.buffered_bytes <= 10_000


def test_split_rejects_bad_arguments():
    with pytest.raises(ValueError):
        split_payload(b"x", 0, TID)
    with pytest.raises(ValueError):
        split_payload(b"x", 10, b"short")
    with pytest.raises(ValueError):
        chunk_data_size(50)
