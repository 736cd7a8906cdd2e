"""Self-describing update payloads: header, indices, scales, codes; error feedback on the encode side.

Layout (little-endian): a 32-byte header
    magic "FU", version u8, method u8, bits u8, index coding u8, flags u8, reserved u8 (0),
    n_params u32, k u32, block_size u32 (0 for float32), index_bytes u32, seed u64 (0 unless seed-coded)
then the body (zlib-compressed as a whole when flag 1 is set): index bytes, float32 scales (one per block), codes
(int8, or int4 two per byte), or k float32 values when bits == 32. Every field is checked against the others and
against the expected model size before anything proportional to the claimed sizes is allocated.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from protocol.compression.index_coding import (
    BITMAP,
    VARINT,
    bitmap_size,
    decode_indices,
    encode_indices,
    varint_bound,
)
from protocol.compression.quantize import dequantize, n_blocks, pack, packed_size, quantize, unpack
from protocol.compression.settings import MAX_BLOCK, MIN_BLOCK, CompressionSettings
from protocol.compression.sparsify import randk_indices, topk_indices
from protocol.errors import ProtocolError, Reason

MAGIC = b"FU"
VERSION = 1
_HEADER = struct.Struct("<2sBBBBBBIIIIQ")
HEADER_BYTES = _HEADER.size
METHOD_CODES = {"dense": 0, "topk": 1, "randk": 2}
_METHOD_NAMES = {v: k for k, v in METHOD_CODES.items()}
INDEX_NONE, INDEX_SEED = 0, 3
FLAG_ZLIB, FLAG_STOCHASTIC = 1, 2
MAX_PARAMS = (1 << 31) - 1
_F32 = np.dtype("<f4")


@dataclass(frozen=True)
class PayloadHeader:
    """An update payload's header once `read_header` has bounded every field, so decoding can size buffers from it."""

    version: int
    method: str
    bits: int
    index_coding: int
    flags: int
    n_params: int
    k: int
    block_size: int
    index_bytes: int
    seed: int

    @property
    def value_bytes(self) -> int:
        return _value_bytes(self.k, self.bits, self.block_size)


def _value_bytes(k: int, bits: int, block_size: int) -> int:
    """Bytes of the value section: k float32, or one float32 scale per block plus the packed codes."""
    if bits == 32:
        return 4 * k
    return 4 * n_blocks(k, block_size) + packed_size(k, bits)


def max_payload_bytes(n_params: int) -> int:
    """No valid payload for an n_params model is longer than this (a dense float32 vector plus a bitmap)."""
    return HEADER_BYTES + bitmap_size(n_params) + 4 * n_params + 8


def encoded_size_bound(n_params: int, settings: CompressionSettings) -> int:
    """Guaranteed upper bound on len(encode_update(...)) for these settings (what adaptive_settings budgets)."""
    k = settings.k(n_params)
    if settings.method == "dense" or (settings.method == "randk" and settings.seed is not None):
        index = 0
    else:
        index = min(varint_bound(n_params, k), bitmap_size(n_params))
    return HEADER_BYTES + index + _value_bytes(k, settings.bits, settings.block_size)


def encode_update(delta: np.ndarray, settings: CompressionSettings, residual: np.ndarray | None = None,
                  rng: np.random.Generator | None = None) -> tuple[bytes, np.ndarray]:
    """(payload, new residual): compress delta + residual; the residual is what the payload failed to carry.

    The device persists the residual and passes it back next round (error feedback), so coordinates that were
    dropped or rounded away are sent later instead of being lost.
    """
    if delta.ndim != 1 or delta.dtype != np.float32:
        raise ProtocolError(Reason.BAD_SHAPE, f"delta must be 1-D float32, got {delta.dtype} {delta.shape}")
    n = delta.shape[0]
    if n > MAX_PARAMS:
        raise ProtocolError(Reason.TOO_LARGE, f"{n} params")
    x = delta if residual is None else delta + _check_residual(residual, n)
    if not np.isfinite(x).all():
        raise ProtocolError(Reason.NON_FINITE, "delta + residual has NaN/Inf")
    k = settings.k(n)
    seed = 0
    if settings.method == "dense":
        idx, coding, index_bytes = None, INDEX_NONE, b""
    else:
        if settings.method == "randk" and settings.seed is not None:
            idx, seed, coding, index_bytes = randk_indices(settings.seed, n, k), settings.seed, INDEX_SEED, b""
        else:
            if settings.method == "topk":
                idx = topk_indices(x, k)
            else:
                idx = np.sort((rng or np.random.default_rng()).choice(n, size=k, replace=False)).astype(np.int64)
            coding, index_bytes = encode_indices(idx, n)
    values = x if idx is None else x[idx]
    if settings.bits == 32:
        sent = values.astype(_F32)
        value_bytes = sent.tobytes()
        block = 0
    else:
        codes, scales = quantize(values, settings.bits, settings.block_size, settings.stochastic, rng)
        sent = dequantize(codes, scales, settings.block_size)
        value_bytes = scales.astype(_F32).tobytes() + pack(codes, settings.bits)
        block = settings.block_size
    body = index_bytes + value_bytes
    flags = FLAG_STOCHASTIC if settings.stochastic and settings.bits != 32 else 0
    if settings.entropy and body:
        packed = zlib.compress(body, 6)
        if len(packed) < len(body):
            body, flags = packed, flags | FLAG_ZLIB
    header = _HEADER.pack(MAGIC, VERSION, METHOD_CODES[settings.method], settings.bits, coding, flags, 0,
                          n, k, block, len(index_bytes), seed)
    new_residual = x.astype(np.float32, copy=True)
    if idx is None:
        new_residual -= sent
    else:
        new_residual[idx] -= sent
    return header + body, new_residual


def _check_residual(residual: np.ndarray, n: int) -> np.ndarray:
    if residual.shape != (n,) or residual.dtype != np.float32:
        raise ProtocolError(Reason.BAD_SHAPE, f"residual {residual.dtype} {residual.shape} for {n} params")
    return residual


def read_header(payload: bytes, n_params: int) -> PayloadHeader:
    """Parse and cross-check the header against the expected model size; nothing is allocated from it yet."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(Reason.WRONG_TYPE, "payload must be bytes")
    if not 0 <= n_params <= MAX_PARAMS:
        raise ProtocolError(Reason.BAD_SHAPE, f"expected n_params {n_params} out of range")
    if len(payload) > max_payload_bytes(n_params):
        raise ProtocolError(Reason.TOO_LARGE, f"{len(payload)} bytes for a {n_params}-parameter model")
    if len(payload) < HEADER_BYTES:
        raise ProtocolError(Reason.MALFORMED, "payload shorter than its header")
    magic, version, method, bits, coding, flags, reserved, n, k, block, index_bytes, seed = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolError(Reason.MALFORMED, "bad magic")
    if version != VERSION:
        raise ProtocolError(Reason.UNKNOWN_VERSION, f"payload version {version}")
    if n != n_params:
        raise ProtocolError(Reason.BAD_SHAPE, f"payload has {n} params, model has {n_params}")
    if method not in _METHOD_NAMES or bits not in (32, 8, 4) or reserved or flags & ~(FLAG_ZLIB | FLAG_STOCHASTIC):
        raise ProtocolError(Reason.MALFORMED, "unknown method, bit width or flags")
    name = _METHOD_NAMES[method]
    if k > n or (name == "dense") != (k == n and coding == INDEX_NONE) or (n and not k and name != "dense"):
        raise ProtocolError(Reason.BAD_SHAPE, f"k={k} for n={n} with method {name}")
    allowed = {"dense": (INDEX_NONE,), "topk": (VARINT, BITMAP), "randk": (VARINT, BITMAP, INDEX_SEED)}[name]
    if coding not in allowed or (seed and coding != INDEX_SEED):
        raise ProtocolError(Reason.MALFORMED, f"index coding {coding} for method {name}")
    expected_index = {INDEX_NONE: (0, 0), INDEX_SEED: (0, 0), VARINT: (min(k, 1), bitmap_size(n)),
                      BITMAP: (bitmap_size(n), bitmap_size(n))}[coding]
    if not expected_index[0] <= index_bytes <= expected_index[1]:
        raise ProtocolError(Reason.MALFORMED, f"{index_bytes} index bytes for coding {coding}")
    if (bits == 32) != (block == 0) or (bits != 32 and not MIN_BLOCK <= block <= MAX_BLOCK):
        raise ProtocolError(Reason.MALFORMED, f"block size {block} with {bits} bits")
    return PayloadHeader(version, name, bits, coding, flags, n, k, block, index_bytes, seed)


def _check_expected(h: PayloadHeader, s: CompressionSettings) -> None:
    seed = s.seed if s.method == "randk" and s.seed is not None else None
    got = (h.method, h.bits, h.k, h.block_size if h.bits != 32 else None, h.seed if h.index_coding == INDEX_SEED
           else None)
    want = (s.method, s.bits, s.k(h.n_params), s.block_size if s.bits != 32 else None, seed)
    if got != want:
        raise ProtocolError(Reason.BAD_VALUE, f"payload (method, bits, k, block, seed) {got} != expected {want}")


def _body(payload: bytes, h: PayloadHeader) -> memoryview:
    size = h.index_bytes + h.value_bytes
    body = memoryview(payload)[HEADER_BYTES:]
    if not h.flags & FLAG_ZLIB:
        if len(body) != size:
            raise ProtocolError(Reason.MALFORMED, f"body is {len(body)} bytes, header implies {size}")
        return body
    if len(body) >= size:
        raise ProtocolError(Reason.MALFORMED, "compressed body not smaller than the raw one")
    d = zlib.decompressobj()
    try:
        out = d.decompress(body, size + 1)
    except zlib.error as e:
        raise ProtocolError(Reason.MALFORMED, f"zlib: {e}") from None
    if len(out) != size or not d.eof or d.unused_data or d.unconsumed_tail:
        raise ProtocolError(Reason.MALFORMED, "compressed body does not inflate to the size the header implies")
    return memoryview(out)


def decode_sparse(payload: bytes, n_params: int, seed: int | None = None, *,
                  expect: CompressionSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64 sorted unique, values float32 finite) of an update for an n_params model.

    seed: the rand-k seed the edge announced; a seed-coded payload with another seed is refused (BAD_VALUE).
    expect: the settings the round announced; the payload must then use the same method,
    bit width, k, block size and rand-k seed (BAD_VALUE otherwise). An edge should pass one of them: besides
    enforcing the policy, it stops a sender from making the edge derive rand-k coordinates for seeds and k of its
    choosing (an O(n_params) computation each).
    """
    idx, values = _decode(payload, n_params, seed, expect)
    return (np.arange(n_params, dtype=np.int64) if idx is None else idx), values


def _decode(payload: bytes, n_params: int, seed: int | None,
            expect: CompressionSettings | None) -> tuple[np.ndarray | None, np.ndarray]:
    """decode_sparse with None for the indices of a dense payload (decode_update needs no arange)."""
    h = read_header(payload, n_params)
    if h.index_coding == INDEX_SEED and seed is not None and h.seed != seed:
        raise ProtocolError(Reason.BAD_VALUE, "rand-k seed differs from the announced one")
    if expect is not None:
        _check_expected(h, expect)
    body = _body(payload, h)
    split = h.index_bytes
    if h.index_coding == INDEX_NONE:
        idx = None
    elif h.index_coding == INDEX_SEED:
        idx = randk_indices(h.seed, n_params, h.k)
    else:
        idx = decode_indices(h.index_coding, body[:split], n_params, h.k)
    if h.bits == 32:
        values = np.frombuffer(body[split:], dtype=_F32).astype(np.float32)
    else:
        nb = n_blocks(h.k, h.block_size)
        scales = np.frombuffer(body[split:split + 4 * nb], dtype=_F32).astype(np.float32)
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise ProtocolError(Reason.NON_FINITE, "scale not finite or negative")
        values = dequantize(unpack(body[split + 4 * nb:], h.k, h.bits), scales, h.block_size)
    if not np.isfinite(values).all():
        raise ProtocolError(Reason.NON_FINITE, "value not finite")
    return idx, values


def decode_update(payload: bytes, n_params: int, seed: int | None = None, *,
                  expect: CompressionSettings | None = None) -> np.ndarray:
    """The dense float32 delta carried by an update for an n_params model (see decode_sparse)."""
    idx, values = _decode(payload, n_params, seed, expect)
    if idx is None:
        return values
    out = np.zeros(n_params, dtype=np.float32)
    out[idx] = values
    return out
