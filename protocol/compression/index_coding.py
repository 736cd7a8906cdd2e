"""Compact sparse indices: delta + LEB128 varint, or a bitmap, whichever is smaller. Vectorised both ways, with no
loop over varint bytes: a varint (at most 5 bytes) is read or written as one little-endian 64-bit word whose byte
lanes carry 7 bits each, so a whole stream is one gather (decode) or one boolean selection (encode).

Varint form: the first index, then (gap - 1) for each next one, so any decodable stream is strictly increasing
(sorted and unique by construction) and only the last index needs a range check.
"""

from __future__ import annotations

import math

import numpy as np

from protocol.errors import ProtocolError, Reason

VARINT, BITMAP = 1, 2
_MAX_VARINT = 5  # indices < 2**32
_U64 = np.dtype("<u8")
_LENGTHS = range(_MAX_VARINT + 1)
# per varint length n: the 7-bit payload lanes of its bytes, its continuation bits, the least value needing n bytes
_PAYLOAD = np.array([sum(0x7F << (8 * j) for j in range(n)) for n in _LENGTHS], dtype=np.uint64)
_CONT = np.array([sum(0x80 << (8 * j) for j in range(n - 1)) for n in _LENGTHS], dtype=np.uint64)
_LEAST = np.array([0.0, 0.0] + [float(1 << (7 * (n - 1))) for n in _LENGTHS[2:]])
_NEXT_LENGTH = np.array([1 << (7 * n) for n in _LENGTHS[1:-1]], dtype=np.uint64)   # each needs one byte more
_LANE_WEIGHT = np.array([float(1 << (7 * j)) for j in range(8)])   # byte lane j carries value bits 7j..7j+6
# an integer spread into 7 bits per byte lane, in three doubling steps: (low mask, high mask, shift)
_SPREAD = tuple((np.uint64(lo), np.uint64(hi), np.uint64(shift)) for lo, hi, shift in (
    (0x000000000FFFFFFF, 0x0FFFFFFF00000000, 4),
    (0x00003FFF00003FFF, 0x3FFF00003FFF0000, 2),
    (0x007F007F007F007F, 0x7F007F007F007F00, 1)))
_POSITIONS = np.arange(_MAX_VARINT)


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
    nbytes = np.searchsorted(_NEXT_LENGTH, gaps, side="right") + 1
    if int(nbytes.sum()) > bitmap_size(n_params):
        bits = np.zeros(n_params, dtype=np.uint8)
        bits[indices] = 1
        return BITMAP, np.packbits(bits, bitorder="little").tobytes()
    for lo, hi, shift in _SPREAD:
        gaps = (gaps & lo) | ((gaps << shift) & hi)
    lanes = (gaps | _CONT[nbytes]).astype(_U64, copy=False).view(np.uint8).reshape(-1, 8)[:, :_MAX_VARINT]
    return VARINT, lanes[_POSITIONS < nbytes[:, None]].tobytes()   # row-major: each varint's first nbytes bytes


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
    ends = np.flatnonzero(raw < 0x80)
    if ends.shape[0] != k:
        raise ProtocolError(Reason.BAD_SHAPE, f"{ends.shape[0]} varints, header says {k}")
    lengths = np.empty(k, dtype=np.int64)
    lengths[0] = ends[0] + 1
    np.subtract(ends[1:], ends[:-1], out=lengths[1:])
    if lengths.max() > _MAX_VARINT:
        raise ProtocolError(Reason.BAD_INDEX, "varint longer than 5 bytes")
    gaps = _varints(raw, ends - (lengths - 1), lengths)
    if (gaps < _LEAST[lengths]).any() or gaps.max() >= 1 << 32:   # a zero last byte, or a 5th byte over 0x0F
        raise ProtocolError(Reason.MALFORMED, "non-canonical or over-wide varint")
    gaps = gaps.astype(np.int64)
    gaps[1:] += 1
    idx = np.cumsum(gaps)
    if idx[-1] >= n_params:
        raise ProtocolError(Reason.BAD_INDEX, f"index {idx[-1]} >= n_params {n_params}")
    return idx


def _varints(raw: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Values (float64, exact below 2**53) of the varints of 1-5 bytes at `starts`: the 8 bytes from each start
    read as one word (an unaligned strided view over a zero-padded copy), bytes past its length and continuation
    bits masked off, then the 7-bit lanes weighted and summed."""
    padded = np.zeros(raw.shape[0] + 8, dtype=np.uint8)
    padded[:raw.shape[0]] = raw
    words = np.ndarray(raw.shape, dtype=_U64, buffer=padded, strides=(1,))[starts]
    words &= _PAYLOAD[lengths]
    return words.astype(_U64, copy=False).view(np.uint8).reshape(-1, 8) @ _LANE_WEIGHT
