"""Multi-Krum (Blanchard et al. 2017): keep the n - f updates closest to their n - f - 2 nearest neighbours.

Score_i = sum of the squared distances from update i to its n - f - 2 nearest other updates. Pairwise squared
distances come from the Gram matrix, ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j: one BLAS matrix product, no double loop.
f = floor(byzantine_fraction * n). With too few updates for the rule (n - f - 2 < 1) nothing is flagged.
"""

from __future__ import annotations

import numpy as np

from edge.filters.base import Verdict


def pairwise_sq_distances(X: np.ndarray) -> np.ndarray:
    X64 = X.astype(np.float64, copy=False)
    gram = X64 @ X64.T
    sq = np.diag(gram)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)


def multi_krum(X: np.ndarray, byzantine_fraction: float = 0.2) -> Verdict:
    n = X.shape[0]
    f = int(np.floor(byzantine_fraction * n))
    neighbours = n - f - 2
    if neighbours < 1:
        return Verdict(scores=np.zeros(n), flags=np.zeros(n, dtype=bool))
    dist = pairwise_sq_distances(X)
    np.fill_diagonal(dist, np.inf)
    scores = np.partition(dist, neighbours - 1, axis=1)[:, :neighbours].sum(axis=1)
    keep = np.argsort(scores, kind="stable")[: n - f]
    flags = np.ones(n, dtype=bool)
    flags[keep] = False
    return Verdict(scores=scores, flags=flags)
