"""The two small interfaces every filter and robust aggregator implements (one per module, Flower-strategy style).

- A *filter* scores each update of a round and flags the suspicious ones: `fn(X, **params) -> Verdict`.
- An *aggregator* forms the aggregate itself: `fn(X, weights, **params) -> (d,) float64`.

`X` is the round's stacked (n, d) float32 array of deltas (sparse updates densified, or a column sample of them for
very large rounds: see edge.aggregate.filter_matrix). All are pure and vectorised: no Python loop over updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAD_TO_SIGMA = 0.6745  # MAD of a standard normal: robust z = 0.6745 (x - median) / MAD (Iglewicz & Hoaglin)


@dataclass(frozen=True)
class Verdict:
    """A filter's output: the score per update and which updates it flags, so each filter's decision can be logged."""

    scores: np.ndarray  # float64 (n,): the statistic the decision was made on (logged per device)
    flags: np.ndarray   # bool (n,): True = suspicious


def robust_z(values: np.ndarray) -> np.ndarray:
    """Modified z-scores around the median, scaled by the MAD; 0 everywhere when the values do not spread."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    med = np.median(values)
    mad = np.median(np.abs(values - med))
    if mad <= 1e-12 * max(abs(med), 1e-300):
        return np.zeros_like(values)
    return MAD_TO_SIGMA * (values - med) / mad


def row_norms(X: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
