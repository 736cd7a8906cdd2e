"""Norm bound: flag updates whose L2 norm is an outlier on the high side (robust z-score, median/MAD).

Scaled (boosted) poisoned updates stand out by norm; small norms are harmless, so only the upper tail is flagged.
The z-score is scale-free, so it works unchanged on a column sample of the updates. An update must also exceed
`min_ratio` x the median norm: the MAD of an edge's few norms is small, so on non-IID data an honest device whose
data move the model twice as far scores z > 3.5 round after round (watch02 on watch, EXPERIMENTS.md "The collusion
check"), while boosting and noise attacks send many times the median (the edge's bounds cap whatever passes).
"""

from __future__ import annotations

import numpy as np

from edge.filters.base import Verdict, robust_z, row_norms


def norm_zscore(X: np.ndarray, max_z: float = 3.5, min_ratio: float = 3.0) -> Verdict:
    norms = row_norms(X)
    z = robust_z(norms)
    return Verdict(scores=z, flags=(z > max_z) & (norms > min_ratio * np.median(norms)))
