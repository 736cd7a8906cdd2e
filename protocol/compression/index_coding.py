"""Compact sparse indices: delta + LEB128 varint, or a bitmap, whichever is smaller. Vectorised both ways.

Varint form: the first index, then (gap - 1) for each next one, so any decodable stream is strictly increasing
(sorted and unique by construction) and only the last index needs a range check.
"""

from __future__ import annotations

import math

import numpy as np

from protocol.errors import ProtocolError, Reason

VARINT, BITMAP = 1, 2
_MAX_VARINT = 5  # indices < 2**32


def varint_bound(n_params: int, k: int) -> int:
    """Most bytes the varint form can take: varint_len(g) <= 1 + log2(g + 1) / 7 and, by concavity (Jensen),
    the sum over k gaps adding up to at most n_params is largest when the gaps are equal."""
    if k == 0:
        return 0
    return k + math.ceil(k * math.log2((n_params + k) / k) / 7)


def bitmap_size(n_params: int) -> int:
    return (n_params + 7) // 8


def encode_indices(indices: np.ndarray, n_params: int) -> tuple[int, bytes]:
    """(coding, bytes) for sorted unique int64 indices in [0, n_params)."""
    gaps = np.empty(indices.shape[0], dtype=np.uint64)
    if indices.shape[0]:
        gaps[0] = indices[0]
        gaps[1:] = np.diff(indices) - 1
    nbytes = np.ones(gaps.shape[0], dtype=np.int64)
    for j in range(1, _MAX_VARINT):
        nbytes += gaps >= np.uint64(1 << (7 * j))
    total = int(nbytes.sum())
    if total > bitmap_size(n_params):
        bits = np.zeros(n_params, dtype=np.uint8)
        bits[indices] = 1
        return BITMAP, np.packbits(bits, bitorder="little").tobytes()
    out = np.empty(total, dtype=np.uint8)
    starts = np.cumsum(nbytes) - nbytes
    for j in range(_MAX_VARINT):
        sel = nbytes > j
        chunk = (gaps[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        cont = (nbytes[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (chunk | cont).astype(np.uint8)
    return VARINT, out.tobytes()


def decode_indices(coding: int, buf: bytes | memoryview, n_params: int, k: int) -> np.ndarray:
    """Sorted unique int64 indices in [0, n_params), exactly k of them; ProtocolError otherwise."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if coding == BITMAP:
        if raw.shape[0] != bitmap_size(n_params):
            raise ProtocolError(Reason.MALFORMED, f"bitmap of {raw.shape[0]} bytes for {n_params} params")
        bits = np.unpackbits(raw, bitorder="little")
        if bits[n_params:].any():
            raise ProtocolError(Reason.BAD_INDEX, "bitmap bit set past n_params")
        idx = np.flatnonzero(bits)
        if idx.shape[0] != k:
            raise ProtocolError(Reason.BAD_SHAPE, f"bitmap holds {idx.shape[0]} indices, header says {k}")
        return idx.astype(np.int64, copy=False)
    if coding != VARINT:
        raise ProtocolError(Reason.MALFORMED, f"unknown index coding {coding}")
    if k == 0:
        if raw.shape[0]:
            raise ProtocolError(Reason.MALFORMED, "index bytes for k=0")
        return np.zeros(0, dtype=np.int64)
    if not k <= raw.shape[0] <= k * _MAX_VARINT or raw[-1] & 0x80:
        raise ProtocolError(Reason.MALFORMED, "truncated or oversized varint stream")
    last = (raw & 0x80) == 0
    ends = np.flatnonzero(last)
    if ends.shape[0] != k:
        raise ProtocolError(Reason.BAD_SHAPE, f"{ends.shape[0]} varints, header says {k}")
    starts = np.empty(k, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > _MAX_VARINT:
        raise ProtocolError(Reason.BAD_INDEX, "varint longer than 5 bytes")
    if (raw[ends[lengths > 1]] == 0).any() or (raw[ends[lengths == _MAX_VARINT]] > 0x0F).any():
        raise ProtocolError(Reason.MALFORMED, "non-canonical or over-wide varint")
    pos = np.arange(raw.shape[0], dtype=np.int64) - np.repeat(starts, lengths)
    contrib = (raw & 0x7F).astype(np.uint64) << (pos.astype(np.uint64) * np.uint64(7))
    gaps = np.add.reduceat(contrib, starts).astype(np.int64)
    gaps[1:] += 1
    idx = np.cumsum(gaps)
    if idx[-1] >= n_params:
        raise ProtocolError(Reason.BAD_INDEX, f"index {idx[-1]} >= n_params {n_params}")
    return idx
