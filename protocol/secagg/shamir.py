"""Vectorised Shamir t-of-n secret sharing over the prime field GF(2^31 - 1).

A 32-byte secret is cut into 24-bit chunks (11 field elements), each shared with its own random polynomial, so one
share is 11 elements (44 bytes on the wire). Elements stay below 2^31, so every product fits in int64 and the whole
dealing is a few NumPy passes. Coefficients come from os.urandom (a CSPRNG), never from NumPy's generators.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from protocol.errors import ProtocolError, Reason

PRIME = (1 << 31) - 1
SECRET_BYTES = 32
CHUNKS = -(-SECRET_BYTES // 3)      # 11 elements of 24 bits
SHARE_BYTES = 4 * CHUNKS


def secret_to_elements(secret: bytes) -> np.ndarray:
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    raw = np.frombuffer(secret + bytes(3 * CHUNKS - SECRET_BYTES), np.uint8).reshape(CHUNKS, 3).astype(np.int64)
    return raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)


def elements_to_secret(elements: np.ndarray) -> bytes:
    """Inverse of secret_to_elements; a chunk >= 2^24 or non-zero padding means the shares were inconsistent."""
    if elements.shape != (CHUNKS,) or (elements >> 24).any():
        raise ProtocolError(Reason.SECAGG_ABORT, "reconstructed secret is not a valid secret (inconsistent shares)")
    raw = np.stack([elements & 0xFF, (elements >> 8) & 0xFF, elements >> 16], axis=1).astype(np.uint8).tobytes()
    if any(raw[SECRET_BYTES:]):
        raise ProtocolError(Reason.SECAGG_ABORT, "reconstructed secret has non-zero padding (inconsistent shares)")
    return raw[:SECRET_BYTES]


def _random_elements(shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    return (np.frombuffer(os.urandom(8 * count), np.uint64) % np.uint64(PRIME)).astype(np.int64).reshape(shape)


def split(secret: bytes, xs: np.ndarray, t: int) -> np.ndarray:
    """Shares (len(xs), CHUNKS) of `secret` at the non-zero points `xs`; any t of them reconstruct it."""
    xs = np.asarray(xs, np.int64)
    if not 1 <= t <= len(xs) or (xs <= 0).any() or (xs >= PRIME).any() or len(set(xs.tolist())) != len(xs):
        raise ValueError(f"bad sharing: t={t}, {len(xs)} distinct non-zero points needed")
    coeffs = _random_elements((t - 1, CHUNKS))
    acc = np.zeros((len(xs), CHUNKS), np.int64)
    x = xs[:, None]
    for c in coeffs[::-1]:          # Horner: highest coefficient first, the secret is the constant term
        acc = (acc + c) * x % PRIME
    return (acc + secret_to_elements(secret)) % PRIME


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> np.ndarray:
    """l_i(0) = prod_{j != i} x_j / (x_j - x_i) mod p, one NumPy pass per point."""
    points = np.asarray(xs, np.int64)
    num = np.ones(len(points), np.int64)
    den = np.ones(len(points), np.int64)
    for j, xj in enumerate(points):
        others = np.arange(len(points)) != j
        num = np.where(others, num * xj % PRIME, num)
        den = np.where(others, den * ((xj - points) % PRIME) % PRIME, den)
    inverses = np.array([pow(int(d), PRIME - 2, PRIME) for d in den], np.int64)
    return num * inverses % PRIME


def reconstruct(xs: list[int], shares: np.ndarray) -> bytes:
    """The secret from exactly-t shares `shares[i]` taken at `xs[i]` (Lagrange interpolation at 0)."""
    shares = np.asarray(shares, np.int64)
    if len(set(xs)) != len(xs) or shares.shape != (len(xs), CHUNKS):
        raise ProtocolError(Reason.SECAGG_ABORT, "duplicate share points or malformed shares")
    lam = _lagrange_at_zero(tuple(int(x) for x in xs))
    return elements_to_secret((lam[:, None] * shares % PRIME).sum(axis=0) % PRIME)


def share_to_bytes(share: np.ndarray) -> bytes:
    return np.asarray(share, "<u4").tobytes()


def share_from_bytes(data: bytes) -> np.ndarray:
    if len(data) != SHARE_BYTES:
        raise ProtocolError(Reason.MALFORMED, f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    elements = np.frombuffer(data, "<u4").astype(np.int64)
    if (elements >= PRIME).any():
        raise ProtocolError(Reason.BAD_VALUE, "share element outside the field")
    return elements
