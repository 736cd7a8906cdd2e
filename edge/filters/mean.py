"""Weighted mean (FedAvg with the edge's heterogeneity-aware weights): the default, and the only aggregator whose
sensitivity central DP can bound (see edge.central_dp)."""

from __future__ import annotations

import numpy as np


def weighted_mean(X: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    w = np.ones(X.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    total = w.sum()
    if total <= 0:
        return np.zeros(X.shape[1])
    return (w @ X.astype(np.float64, copy=False)) / total
