"""Symmetric int8/int4 quantisation with one float32 scale per block, round-to-nearest or unbiased stochastic."""

from __future__ import annotations

import numpy as np

from protocol.errors import ProtocolError, Reason


def qmax(bits: int) -> int:
    """Largest code: 127 for int8, 7 for int4 (symmetric, so -128/-8 never appear and are rejected on decode)."""
    return (1 << (bits - 1)) - 1


def n_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def quantize(values: np.ndarray, bits: int, block_size: int, stochastic: bool,
             rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, float32 scales) with values ~= codes * scales[block].

    Stochastic rounding draws floor(v / s + u), u ~ U[0, 1): its expectation is exactly v / s, and because
    |v / s| <= qmax the result never needs clipping, so the estimate stays unbiased.
    """
    q = qmax(bits)
    k = values.shape[0]
    nb = n_blocks(k, block_size)
    padded = np.zeros(nb * block_size, dtype=np.float64)
    padded[:k] = values
    blocks = padded.reshape(nb, block_size)
    scales = (np.abs(blocks).max(axis=1) / q).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)
    scaled = blocks / safe[:, None]
    if stochastic:
        rng = rng if rng is not None else np.random.default_rng()
        codes = np.floor(scaled + rng.random(scaled.shape))
    else:
        codes = np.rint(scaled)
    codes = np.clip(codes, -q, q).astype(np.int8).reshape(-1)[:k]
    return codes, scales


def dequantize(codes: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    """float32 values codes * scales[block] (block-wise broadcast: no per-element scale array)."""
    k = codes.shape[0]
    full = k // block_size * block_size
    out = np.empty(k, dtype=np.float32)
    np.multiply(codes[:full].reshape(-1, block_size), scales[: full // block_size, None],
                out=out[:full].reshape(-1, block_size), casting="unsafe")
    if full < k:
        np.multiply(codes[full:], scales[full // block_size], out=out[full:], casting="unsafe")
    return out


def pack(codes: np.ndarray, bits: int) -> bytes:
    """int8 codes as bytes; int4 codes two per byte (low nibble first, two's complement, zero pad)."""
    if bits == 8:
        return codes.tobytes()
    nib = (codes.astype(np.uint8) & 0x0F)
    if nib.shape[0] % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def packed_size(k: int, bits: int) -> int:
    return k if bits == 8 else (k + 1) // 2


def unpack(buf: bytes | memoryview, k: int, bits: int) -> np.ndarray:
    """Inverse of pack, strict: exact length, no most-negative code, zero padding nibble."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.shape[0] != packed_size(k, bits):
        raise ProtocolError(Reason.MALFORMED, f"{raw.shape[0]} code bytes for k={k} at {bits} bits")
    if bits == 8:
        codes = raw.view(np.int8)
        if codes.size and codes.min() == -128:
            raise ProtocolError(Reason.BAD_VALUE, "int8 code -128 is not used")
        return codes
    both = np.empty(raw.shape[0] * 2, dtype=np.uint8)
    both[0::2] = raw & 0x0F
    both[1::2] = raw >> 4
    if both.shape[0] > k and both[-1] != 0:
        raise ProtocolError(Reason.MALFORMED, "non-zero int4 padding")
    codes = ((both[:k] ^ 8).astype(np.int8) - 8).astype(np.int8)
    if codes.size and codes.min() == -8:
        raise ProtocolError(Reason.BAD_VALUE, "int4 code -8 is not used")
    return codes
