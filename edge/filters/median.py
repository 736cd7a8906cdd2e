"""Coordinate-wise median: the most robust (50% breakdown) and the noisiest of the aggregators. Unweighted."""

from __future__ import annotations

import numpy as np


def coordinate_median(X: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    return np.median(X, axis=0).astype(np.float64)
