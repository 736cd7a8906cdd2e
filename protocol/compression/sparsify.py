"""Which coordinates a device sends: top-k by magnitude, or random-k from a seed the whole cohort shares."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted int64 indices of the k largest |x| (ties broken by argpartition; any k of equal magnitude is fine)."""
    n = x.shape[0]
    if k >= n:
        return np.arange(n, dtype=np.int64)
    part = np.argpartition(np.abs(x), n - k)[n - k:]
    part.sort()
    return part.astype(np.int64, copy=False)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection on uint64, pure integer arithmetic, identical on every numpy version."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@lru_cache(maxsize=4)
def _randk_cached(seed: int, n_params: int, k: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([seed], dtype=np.uint64))[0]
        keys = _splitmix64(base + np.arange(1, n_params + 1, dtype=np.uint64) * _GOLDEN)
    if k >= n_params:
        out = np.arange(n_params, dtype=np.int64)
    elif k == 0:
        out = np.zeros(0, dtype=np.int64)
    else:
        out = np.sort(np.argpartition(keys, k - 1)[:k]).astype(np.int64)
    out.flags.writeable = False
    return out


def randk_indices(seed: int, n_params: int, k: int) -> np.ndarray:
    """The k coordinates (sorted int64, read-only) every device of a cohort derives from the edge's seed.

    Coordinate i gets the key splitmix64(splitmix64(seed) + (i + 1) * golden); the k smallest keys win. Keys are
    distinct (a bijection of distinct inputs), so the choice has no ties and does not depend on numpy's sampling
    algorithms, which differ between the numpy 1.x on a Pi and numpy 2.x at the edge. Cached (4 entries): the edge
    decodes a whole cohort's updates with the same seed.
    """
    if not 0 <= k <= n_params:
        raise ValueError(f"k={k} not in [0, {n_params}]")
    return _randk_cached(int(seed), int(n_params), int(k))
