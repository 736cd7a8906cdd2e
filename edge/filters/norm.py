"""Norm bound: flag updates whose L2 norm is an outlier on the high side (robust z-score, median/MAD).

Scaled (boosted) poisoned updates stand out by norm; small norms are harmless, so only the upper tail is flagged.
The z-score is scale-free, so it works unchanged on a column sample of the updates.
"""

from __future__ import annotations

import numpy as np

from edge.filters.base import Verdict, robust_z, row_norms


def norm_zscore(X: np.ndarray, max_z: float = 3.5) -> Verdict:
    z = robust_z(row_norms(X))
    return Verdict(scores=z, flags=z > max_z)
