"""Poisoning filters and robust aggregators, selectable and composable by name from the edge config.

Filters compose by union: an update flagged by any enabled filter is flagged (then dropped or down-weighted,
`filters.action`). One aggregator forms the aggregate of what is left.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge.filters.base import Verdict
from edge.filters.cosine import cosine_to_median
from edge.filters.krum import multi_krum
from edge.filters.mean import weighted_mean
from edge.filters.median import coordinate_median
from edge.filters.norm import norm_zscore
from edge.filters.trimmed_mean import trimmed_mean

FILTERS: dict[str, Callable[..., Verdict]] = {
    "norm": norm_zscore,
    "cosine": cosine_to_median,
    "krum": multi_krum,
}
AGGREGATORS: dict[str, Callable[..., np.ndarray]] = {
    "mean": weighted_mean,
    "trimmed_mean": trimmed_mean,
    "median": coordinate_median,
}

__all__ = ["FILTERS", "AGGREGATORS", "Verdict", "run_filters"]


def run_filters(X: np.ndarray, names: list[str], params: dict[str, dict]) -> tuple[np.ndarray, dict[str, Verdict]]:
    """Apply each named filter; return (flags = union of all, verdict per filter)."""
    verdicts = {name: FILTERS[name](X, **params.get(name, {})) for name in names}
    flags = np.zeros(X.shape[0], dtype=bool)
    for verdict in verdicts.values():
        flags |= verdict.flags
    return flags, verdicts
