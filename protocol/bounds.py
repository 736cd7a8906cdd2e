"""Trust bounds shared by the edge and the cloud: a reference scale that no single sender can raise.

Each tier remembers the latest value (update norm, sample count) of every sender it counted (a device at the edge,
an edge at the cloud), and scales what one sender may contribute by the *lower median* of those values: one vote
per sender, and the lower median moves up only when more than half of the senders move it. With two senders it is
the smaller value, so at a 2-device edge one device can never enlarge the bound beyond the honest one's scale;
a single sender can only lower it (which costs learning speed, never correctness).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def lower_median(values: list[float] | np.ndarray) -> float:
    """The element at (n - 1) // 2 of the sorted values (0 for none): never above the median, one of the values."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    return float(v[(v.shape[0] - 1) // 2]) if v.shape[0] else 0.0


def remember(latest: Mapping[str, list[float]], new: Mapping[str, list[float]], limit: int) -> dict[str, list[float]]:
    """`latest` with `new`'s senders moved to the most recent end, keeping the `limit` most recent senders."""
    out = {k: v for k, v in latest.items() if k not in new}
    out.update(new)
    return dict(list(out.items())[-limit:]) if limit > 0 else {}


def reference(latest: Mapping[str, list[float]], column: int) -> float:
    """The lower median of one column (e.g. 0: norm, 1: samples) over the remembered senders' finite positive values
    (a zero says nothing about the scale, so it cannot switch a bound off)."""
    return lower_median([v[column] for v in latest.values() if 0 < v[column] < np.inf])


def scale_to(norms: np.ndarray, bound: float) -> np.ndarray:
    """min(1, bound / norm) per row: the factor that brings each norm within `bound` (1 when bound <= 0: off)."""
    norms = np.asarray(norms, dtype=np.float64)
    if bound <= 0 or not np.isfinite(bound):
        return np.ones_like(norms)
    return np.minimum(1.0, bound / np.maximum(norms, 1e-300))
