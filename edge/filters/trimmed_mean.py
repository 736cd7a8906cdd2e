"""Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the `trim` fraction of largest and smallest
values and average the rest. Unweighted by design: a weight would let one device buy its way past the trim."""

from __future__ import annotations

import numpy as np


def trimmed_mean(X: np.ndarray, weights: np.ndarray | None = None, trim: float = 0.1) -> np.ndarray:
    n = X.shape[0]
    k = int(np.floor(trim * n))
    if n - 2 * k < 1:
        k = (n - 1) // 2
    if k == 0:
        return X.mean(axis=0, dtype=np.float64)
    part = np.partition(X, (k, n - k - 1), axis=0)
    return part[k: n - k].mean(axis=0, dtype=np.float64)
