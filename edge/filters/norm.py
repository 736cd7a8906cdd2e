"""Norm bound: flag updates whose L2 norm is an outlier on the high side (robust z-score, median/MAD).

Scaled (boosted) poisoned updates stand out by norm; small norms are harmless, so only the upper tail is flagged.
The z-score is scale-free, so it works unchanged on a column sample of the updates. In a round of fewer than
`ratio_below` updates an update must also exceed `min_ratio` x the median norm: the MAD of a few norms is small,
so on non-IID data an honest device whose data move the model further scores z > 3.5 round after round (watch02 at
watch's edges of 5 sends 3-27x the median; EXPERIMENTS.md "The norm filter's floor at 100x"). The edge's bounds
scale every update that passes down to the median norm, so a boosted one counts as one ordinary step and only
updates no honest step comes near (noise, model replacement) are worth dropping here. Over more norms the MAD is
well estimated and the z-score alone decides (at 100 devices per edge a floor let through noisy updates of devices
with 2-5 records).
"""

from __future__ import annotations

import numpy as np

from edge.filters.base import Verdict, robust_z, row_norms


def norm_zscore(X: np.ndarray, max_z: float = 3.5, min_ratio: float = 100.0, ratio_below: int = 20) -> Verdict:
    norms = row_norms(X)
    z = robust_z(norms)
    floor = min_ratio * np.median(norms) if norms.size < ratio_below else 0.0
    return Verdict(scores=z, flags=(z > max_z) & (norms > floor))
