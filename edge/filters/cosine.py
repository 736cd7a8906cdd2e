"""Direction check: cosine similarity of each update to the coordinate-wise median of the round.

The median direction is what most devices agree on; sign-flipped or off-direction updates score low. Flags updates
whose cosine is below `min_cos`. When the median is zero (e.g. very sparse top-k updates that rarely overlap) every
score is 0 and nothing is flagged, so this filter never rejects on a degenerate reference.
"""

from __future__ import annotations

import numpy as np

from edge.filters.base import Verdict, row_norms


def cosine_to_median(X: np.ndarray, min_cos: float = 0.0) -> Verdict:
    median = np.median(X, axis=0)
    denom = row_norms(X) * float(np.linalg.norm(median))
    dots = X.astype(np.float64, copy=False) @ median.astype(np.float64)
    cos = np.divide(dots, denom, out=np.zeros(X.shape[0]), where=denom > 0)
    return Verdict(scores=cos, flags=cos < min_cos)
