"""Direction check: cosine similarity of each update to the coordinate-wise median of the round.

The median direction is what most devices agree on; sign-flipped or off-direction updates score low. Flags updates
whose cosine is below `min_cos`. When the median is zero (e.g. very sparse top-k updates that rarely overlap) every
score is 0 and nothing is flagged, so this filter never rejects on a degenerate reference.
"""

from __future__ import annotations

import numpy as np

from edge.filters.base import Verdict, row_norms


def cosine_to_median(X: np.ndarray, min_cos: float = 0.0) -> Verdict:
    cols, median = sparse_median(X)
    denom = row_norms(X) * float(np.linalg.norm(median))
    dots = _columns(X, cols).astype(np.float64) @ median.astype(np.float64)
    cos = np.divide(dots, denom, out=np.zeros(X.shape[0]), where=denom > 0)
    return Verdict(scores=cos, flags=cos < min_cos)


def sparse_median(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(columns, np.median of X over rows in those columns): the median of every other column is 0, because zeros
    fill both middle positions of it sorted. Sparse rounds have few columns with nonzeros in half the rows, so
    this partitions those instead of all (at 10,000 x 5,000 cells: 0.97 s -> ~0.05 s)."""
    n = X.shape[0]
    cols = np.flatnonzero((X != 0).sum(axis=0, dtype=np.int64) > min((n - 1) // 2, n - 1 - n // 2))
    return cols, np.median(_columns(X, cols), axis=0)


def _columns(X: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """X[:, cols] without copying a dense round's whole matrix when cols is every column."""
    return X if cols.shape[0] == X.shape[1] else X[:, cols]
