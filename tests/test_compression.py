"""Update compression: round trips, error feedback, unbiased rounding, index coding, hostile payloads, policy."""

from __future__ import annotations

import dataclasses
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import messages
from protocol.compression import (
    HEADER_BYTES,
    CompressionSettings,
    adaptive_settings,
    decode_sparse,
    decode_update,
    encode_update,
    encoded_size_bound,
    randk_indices,
    read_header,
)
from protocol.compression.adaptive import DENSITIES
from protocol.compression.index_coding import BITMAP, VARINT, decode_indices, encode_indices, varint_bound
from protocol.compression.quantize import dequantize, quantize
from protocol.errors import ProtocolError, Reason
from protocol.samples import sample_messages


def heavy_tailed(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(3, n) * 1e-3).astype(np.float32)


ALL_SETTINGS = [CompressionSettings(method=m, bits=b, density=d, seed=s, stochastic=st_, entropy=e)
                for m, s in (("topk", None), ("randk", 7), ("randk", None), ("dense", None))
                for b in (32, 8, 4) for d in (0.3, 0.01) for st_, e in ((False, True), (True, False))]


@pytest.mark.parametrize("s", ALL_SETTINGS, ids=lambda s: f"{s.method}-{s.bits}-{s.density}-{s.stochastic}")
def test_round_trip_and_residual_account_for_every_coordinate(s):
    delta, residual_in = heavy_tailed(5000, 1), heavy_tailed(5000, 2) / 10
    payload, residual = encode_update(delta, s, residual_in, rng=np.random.default_rng(3))
    decoded = decode_update(payload, 5000)
    idx, values = decode_sparse(payload, 5000)
    assert decoded.dtype == np.float32 and decoded.shape == (5000,)
    np.testing.assert_allclose(decoded + residual, delta + residual_in, atol=1e-7)
    assert idx.shape[0] == s.k(5000) and (np.diff(idx) > 0).all() and np.array_equal(decoded[idx], values)
    sent = np.zeros(5000, bool)
    sent[idx] = True
    assert not decoded[~sent].any()
    if s.bits == 32:
        np.testing.assert_array_equal(values, (delta + residual_in)[idx])
    h = read_header(payload, 5000)
    assert (h.method, h.bits, h.k) == (s.method, s.bits, s.k(5000))


def test_topk_sends_the_largest_magnitudes():
    delta = heavy_tailed(10_000)
    idx, _ = decode_sparse(encode_update(delta, CompressionSettings(density=0.01, bits=32))[0], 10_000)
    assert set(idx.tolist()) == set(np.argsort(-np.abs(delta))[:100].tolist())


def test_error_feedback_delivers_what_was_dropped():
    """With a constant delta, the sum of what was sent over T rounds is T*delta minus a bounded residual."""
    delta = heavy_tailed(2000)
    s = CompressionSettings(density=0.05, bits=4)
    residual, total = None, np.zeros(2000, np.float32)
    for _ in range(200):
        payload, residual = encode_update(delta, s, residual)
        total += decode_update(payload, 2000)
    np.testing.assert_allclose(total + residual, 200 * delta, rtol=1e-3, atol=1e-4)
    # Without feedback the same 5% would be sent every round and the rest never.
    no_feedback = decode_update(encode_update(delta, s)[0], 2000)
    err, err_without = np.linalg.norm(total / 200 - delta), np.linalg.norm(no_feedback - delta)
    assert err < 0.1 * err_without
    assert (total != 0).mean() > 0.8 and (no_feedback != 0).mean() <= 0.05


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    values = np.array([1.0, 0.3, -0.55, 0.05, 0.71], np.float64)  # 1.0 fixes the block scale at 1/7 for int4
    rng = np.random.default_rng(0)
    draws = np.stack([dequantize(*quantize(values, 4, 8, True, rng), 8) for _ in range(20_000)])
    scale = 1.0 / 7
    stderr = scale / 2 / np.sqrt(len(draws))  # a rounding error's std is at most scale/2
    assert np.all(np.abs(draws.mean(axis=0) - values) < 5 * stderr)
    nearest = dequantize(*quantize(values, 4, 8, False), 8)
    assert np.abs(nearest - values).max() > 20 * stderr  # deterministic rounding keeps its bias


def test_quantization_error_is_within_half_a_step_per_block():
    v = heavy_tailed(4096).astype(np.float64)
    for bits, q in ((8, 127), (4, 7)):
        codes, scales = quantize(v, bits, 64, False)
        err = np.abs(dequantize(codes, scales, 64) - v).reshape(-1, 64).max(axis=1)
        assert np.all(err <= scales / 2 * 1.001 + 1e-12)
        assert codes.min() >= -q and codes.max() <= q


def test_randk_indices_are_shared_deterministic_and_spread():
    a = randk_indices(42, 100_000, 1000)
    assert np.array_equal(a, randk_indices(42, 100_000, 1000)) and not a.flags.writeable
    assert a.dtype == np.int64 and len(np.unique(a)) == 1000 and a[0] >= 0 and a[-1] < 100_000
    assert not np.array_equal(a, randk_indices(43, 100_000, 1000))
    # Pinned: devices on other numpy versions must pick the same coordinates (pure integer arithmetic).
    assert randk_indices(42, 1000, 5).tolist() == [494, 498, 525, 537, 668]
    counts = np.bincount(a // 10_000, minlength=10)
    assert counts.min() > 60 and counts.max() < 140
    with pytest.raises(ValueError):
        randk_indices(1, 10, 11)


def test_randk_with_seed_sends_no_indices_and_checks_the_expected_settings():
    delta = heavy_tailed(100_000)
    announced = CompressionSettings(method="randk", seed=9, density=0.01)
    seeded, _ = encode_update(delta, announced)
    explicit, _ = encode_update(delta, CompressionSettings(method="randk", density=0.01, entropy=False))
    assert len(seeded) < len(explicit) - 1000
    assert np.array_equal(decode_sparse(seeded, 100_000, expect=announced)[0], randk_indices(9, 100_000, 1000))
    for other in (dataclasses.replace(announced, seed=10), dataclasses.replace(announced, density=0.02),
                  dataclasses.replace(announced, bits=4), dataclasses.replace(announced, method="topk")):
        with pytest.raises(ProtocolError) as e:
            decode_update(seeded, 100_000, expect=other)
        assert e.value.reason == Reason.BAD_VALUE
    with pytest.raises(ProtocolError):
        decode_sparse(explicit, 100_000, expect=announced)  # coordinates not from the announced seed
    assert decode_sparse(seeded, 100_000, 9)[0].shape == (1000,)
    with pytest.raises(ProtocolError) as e:
        decode_sparse(seeded, 100_000, 10)                  # the announced seed alone, positionally
    assert e.value.reason == Reason.BAD_VALUE


@pytest.mark.parametrize("n,idx", [
    (1000, np.arange(0, 1000, 2)),                   # dense: bitmap is smaller
    (100_000, np.arange(5, 100_000, 997)),           # sparse: varint
    (70_000, np.array([0, 69_999])),
    (2**31 - 1, np.array([0, 2**31 - 2])),           # the widest gap a payload can hold
])
def test_index_coding_picks_the_smaller_form_and_round_trips(n, idx):
    coding, data = encode_indices(idx.astype(np.int64), n)
    assert len(data) <= min((n + 7) // 8, varint_bound(n, len(idx)))
    assert coding == (BITMAP if len(idx) > n / 16 else VARINT)
    assert np.array_equal(decode_indices(coding, data, n, len(idx)), idx)


@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), min_size=1))))
@settings(max_examples=150, deadline=None)
def test_index_coding_property(case):
    n, chosen = case
    idx = np.array(sorted(chosen), np.int64)
    coding, data = encode_indices(idx, n)
    assert len(data) <= min((n + 7) // 8, varint_bound(n, len(idx)))
    assert np.array_equal(decode_indices(coding, data, n, len(idx)), idx)


@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=0, max_size=300), st.sampled_from(ALL_SETTINGS))
@settings(max_examples=150, deadline=None)
def test_round_trip_property(values, s):
    delta = np.array(values, np.float32)
    payload, residual = encode_update(delta, s, rng=np.random.default_rng(0))
    assert len(payload) <= encoded_size_bound(len(delta), s)
    np.testing.assert_allclose(decode_update(payload, len(delta)) + residual, delta, rtol=1e-6, atol=1e-3)


def test_top1pct_int8_is_over_50x_smaller_than_dense_and_decodes_fast():
    n = 1_000_000
    payload, _ = encode_update(heavy_tailed(n), CompressionSettings(density=0.01, bits=8))
    assert 4 * n / len(payload) >= 50
    times = []
    for _ in range(7):
        t = time.perf_counter()
        decode_update(payload, n)
        times.append(time.perf_counter() - t)
    assert min(times) < 0.005, f"decode of 1M params at 1% took {min(times) * 1e3:.2f} ms"


# ------------------------------------------------------------------ hostile payloads
def _payload(n=1000, **kw) -> bytes:
    return encode_update(heavy_tailed(n), CompressionSettings(**{"entropy": False, **kw}))[0]


def _patch(payload: bytes, fmt: str, offset: int, value) -> bytes:
    b = bytearray(payload)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _reason(payload, n=1000, **kw) -> Reason:
    with pytest.raises(ProtocolError) as e:
        decode_sparse(payload, n, **kw)
    return e.value.reason


def test_hostile_headers_get_typed_errors():
    p = _payload()
    assert _reason(p, 999) == Reason.BAD_SHAPE                       # model size differs
    assert _reason(p[:HEADER_BYTES - 1]) == Reason.MALFORMED         # truncated header
    assert _reason(p[:-1]) == Reason.MALFORMED                       # truncated body
    assert _reason(p + b"\0") == Reason.MALFORMED                    # trailing bytes
    assert _reason(b"XX" + p[2:]) == Reason.MALFORMED                # magic
    assert _reason(_patch(p, "B", 2, 2)) == Reason.UNKNOWN_VERSION
    assert _reason(_patch(p, "B", 4, 16)) == Reason.MALFORMED        # bit width
    assert _reason(_patch(p, "B", 7, 1)) == Reason.MALFORMED         # reserved byte
    assert _reason(_patch(p, "<I", 12, 1001)) == Reason.BAD_SHAPE    # k > n
    assert _reason(_patch(p, "<I", 16, 0)) == Reason.MALFORMED       # block size 0 with int8
    assert _reason(b"\0" * 10_000, 10) == Reason.TOO_LARGE           # longer than any valid payload
    assert _reason("not bytes") == Reason.WRONG_TYPE


def test_hostile_bodies_get_typed_errors():
    p = _payload(bits=32, density=0.01)                              # 10 indices, varint, then 10 float32
    h = read_header(p, 1000)
    nan_value = p[:-4] + struct.pack("<f", float("nan"))
    assert _reason(nan_value) == Reason.NON_FINITE
    q = _payload(bits=8, density=0.01)
    scale_at = HEADER_BYTES + read_header(q, 1000).index_bytes
    assert _reason(_patch(q, "<f", scale_at, float("inf"))) == Reason.NON_FINITE
    assert _reason(_patch(q, "<f", scale_at, -1.0)) == Reason.NON_FINITE
    assert _reason(q[:-1] + b"\x80") == Reason.BAD_VALUE            # int8 code -128
    # Ten indices ending at 1000 in a 1000-parameter model.
    far = encode_indices(np.arange(991, 1001), 1001)[1]
    moved = _patch(p[:HEADER_BYTES] + far + p[HEADER_BYTES + h.index_bytes:], "<I", 20, len(far))
    assert _reason(moved) == Reason.BAD_INDEX
    assert _reason(_patch(p, "B", HEADER_BYTES + h.index_bytes - 1, 0x80)) == Reason.MALFORMED  # ends mid-varint
    overlong = _patch(p[:HEADER_BYTES] + bytes([0x81, 0x00]) + b"\x00" * 9 + p[HEADER_BYTES + h.index_bytes:],
                      "<I", 20, 11)
    assert _reason(overlong) == Reason.MALFORMED                     # 1 written as 0x81 0x00


def test_zlib_bombs_and_lies_are_refused_without_inflating_them():
    p = _payload(bits=32, density=0.5, entropy=False)
    bomb = zlib.compress(b"\0" * 1_000_000)  # ~1 KB that would inflate to 1 MB
    hdr = _patch(p[:HEADER_BYTES], "B", 6, 1)                       # zlib flag on
    assert _reason(hdr + bomb) == Reason.MALFORMED                   # inflates past the size the header implies
    assert _reason(hdr + b"\x78\x9c garbage") == Reason.MALFORMED
    assert _reason(hdr + zlib.compress(p[HEADER_BYTES:-8])) == Reason.MALFORMED  # inflates short


def test_bitmap_with_the_wrong_count_or_padding_is_refused():
    p = _payload(n=100, density=0.5, bits=32)                        # 50 of 100: bitmap
    h = read_header(p, 100)
    assert h.index_coding == BITMAP and h.index_bytes == 13
    last = HEADER_BYTES + 12
    assert _reason(_patch(p, "B", last, p[last] | 0x80), 100) == Reason.BAD_INDEX   # bit 103 > n
    assert _reason(_patch(p, "B", HEADER_BYTES, p[HEADER_BYTES] ^ 0x01), 100) == Reason.BAD_SHAPE


# ------------------------------------------------------------------ settings and policy
def test_settings_dict_round_trip_through_a_round_announcement():
    s = CompressionSettings(method="randk", density=0.02, bits=4, block_size=64, stochastic=True, seed=2**64 - 1)
    assert CompressionSettings.from_dict(s.to_dict()) == s
    announcement = next(m for m in sample_messages() if isinstance(m, messages.RoundAnnouncement))
    wire = messages.encode(dataclasses.replace(announcement, compression=s.to_dict()))
    assert CompressionSettings.from_dict(messages.decode(wire).compression) == s


@pytest.mark.parametrize("bad", [
    {"bits": 16}, {"bits": True}, {"density": 0.0}, {"density": 1.5}, {"density": "0.1"}, {"method": "zstd"},
    {"block_size": 4}, {"seed": -1}, {"seed": 2**64}, {"stochastic": 1}, {"extra": 1},
])
def test_settings_from_dict_is_strict(bad):
    d = {**CompressionSettings().to_dict(), **bad}
    with pytest.raises(ProtocolError) as e:
        CompressionSettings.from_dict(d)
    assert e.value.reason in (Reason.BAD_VALUE, Reason.MALFORMED)
    with pytest.raises(ProtocolError):
        CompressionSettings.from_dict([1, 2])


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8))


@given(st.dictionaries(st.sampled_from(sorted(CompressionSettings.__dataclass_fields__) + ["x"]), SCALARS))
@settings(max_examples=300, deadline=None)
def test_settings_from_any_scalar_map_raise_only_protocol_errors(d):
    try:
        s = CompressionSettings.from_dict(d)
    except ProtocolError:
        return
    assert CompressionSettings.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("n,bw,cls,cap", [
    (100_000, 1e6, "pi", 128 * 1024), (100_000, 2e4, "wearable", 64 * 1024), (1_000_000, 1e7, "server", 128 * 1024),
    (50_000, 1e9, "server", 1 << 20), (1_000_000, 1e5, "phone", 64 * 1024),
])
def test_adaptive_settings_fit_the_cap_and_the_link(n, bw, cls, cap):
    s = adaptive_settings(n, bw, cls, cap, deadline_s=30)
    payload, _ = encode_update(heavy_tailed(n), s)
    assert len(payload) <= min(cap - 1024, bw / 8 * 30 * 0.25)
    assert s.method == "dense" or s.density <= {"server": 1, "pi": 0.1, "phone": 0.1, "wearable": 0.01}[cls]


def test_adaptive_settings_trade_density_for_bandwidth_and_refuse_the_impossible():
    fast = adaptive_settings(100_000, 1e7, "pi", 1 << 20)
    slow = adaptive_settings(100_000, 2e3, "pi", 1 << 20)
    assert (fast.density, fast.bits) == (0.1, 8) and slow.density < 0.1
    assert adaptive_settings(50_000, 1e9, "server", 1 << 20).method == "dense"
    # Maximal: the next denser setting of the same class would not have fitted the budget.
    budget = 2e3 / 8 * 60 * 0.25
    assert encoded_size_bound(100_000, slow) <= budget
    for d in (d for d in DENSITIES if slow.density < d <= 0.1):
        assert encoded_size_bound(100_000, CompressionSettings(density=d, bits=4)) > budget
    with pytest.raises(ProtocolError) as e:
        adaptive_settings(10_000_000, 10, "wearable", 2048)
    assert e.value.reason == Reason.TOO_LARGE
    with pytest.raises(ProtocolError):
        adaptive_settings(1000, 1e6, "toaster", 1 << 20)


def test_codec_bench_quick_reports_the_issue_figures(tmp_path):
    import argparse

    from experiments.bench.codec import run

    figures = run(argparse.Namespace(quick=True, out=tmp_path))
    keys = {"params", "density", "bits", "encoded_bytes", "dense_fp32_bytes", "encode_ms", "decode_ms",
            "numpy_roundtrip_ms"}
    assert all(keys <= set(row) for row in figures["cases"])
    assert any((r["params"], r["density"], r["bits"]) == (1_000_000, 0.01, 8) for r in figures["cases"])
    assert figures["summary"]["top1pct_int8_ratio"] >= 50 and (tmp_path / "codec.png").stat().st_size > 10_000
