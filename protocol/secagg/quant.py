"""Fixed-point quantization into the ring Z_(2^R) and R-bit packing of masked vectors.

A value x is clipped to [-clip, clip] and mapped to an integer q in [0, 2^bits - 1] by stochastic rounding
(unbiased: E[q] is exact), so the sum of n quantized inputs is below n * 2^bits. Masking happens modulo 2^R with
R = bits + ceil(log2 n) <= 32 (masks are uint32 PRG output reduced mod 2^R, and 2^R divides 2^32), so the ring is
just large enough for the cohort sum to never wrap, and a masked value costs R bits on the wire instead of 32.
Defaults: clip 1.0 (an on-device L2 clip bound C also bounds every coordinate by C), 16 bits: a step of
2 * clip / 65535 ~= 3e-5.
"""

from __future__ import annotations

import math

import numpy as np

from protocol.errors import ProtocolError, Reason


def ring_bits(bits: int, cohort: int) -> int:
    r = bits + max(1, math.ceil(math.log2(max(cohort, 2))))
    if r > 32:
        raise ProtocolError(Reason.BAD_VALUE, f"{bits}-bit inputs x {cohort} devices need {r} > 32 ring bits")
    return r


def levels(bits: int) -> int:
    """The largest quantized value of one input (also the largest count an input can carry on the grid)."""
    return (1 << bits) - 1


def on_grid(counts, clip: float, bits: int) -> np.ndarray:
    """Counts (capped at `levels(bits)`) as input values that quantize to exactly those counts (a fractional count
    rounds stochastically, unbiased): how a masked vector carries sample and device counts next to its values, so
    that only their sum is unmasked."""
    top = levels(bits)
    return -clip + np.minimum(np.asarray(counts, np.float64), top) * (2 * clip / top)


def quantize(x: np.ndarray, clip: float, bits: int, rng: np.random.Generator | None = None) -> np.ndarray:
    top = levels(bits)
    scaled = (np.clip(np.asarray(x, np.float64), -clip, clip) + clip) * (top / (2 * clip))
    noise = (rng or np.random.default_rng()).random(scaled.shape)
    return np.minimum(np.floor(scaled + noise), top).astype(np.uint32)


def dequantize_sum(q_sum: np.ndarray, count: int, clip: float, bits: int) -> np.ndarray:
    """The float sum of `count` inputs from the sum of their quantized values."""
    return (np.asarray(q_sum, np.float64) * (2 * clip / levels(bits)) - count * clip).astype(np.float32)


def pack(values: np.ndarray, r: int) -> bytes:
    """R-bit little-endian bit planes: plane j holds bit j of every value."""
    values = np.asarray(values, np.uint32)
    return b"".join(np.packbits(((values >> np.uint32(j)) & np.uint32(1)).astype(np.uint8), bitorder="little")
                    .tobytes() for j in range(r))


def packed_size(length: int, r: int) -> int:
    return r * (-(-length // 8))


def unpack(data: bytes, length: int, r: int) -> np.ndarray:
    if len(data) != packed_size(length, r):
        raise ProtocolError(Reason.BAD_SHAPE, f"{len(data)} bytes for {length} values of {r} bits")
    planes = np.frombuffer(data, np.uint8).reshape(r, -1)
    out = np.zeros(length, np.uint32)
    for j in range(r):
        out |= np.unpackbits(planes[j], count=length, bitorder="little").astype(np.uint32) << np.uint32(j)
    return out
