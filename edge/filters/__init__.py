"""Poisoning filters and robust aggregators, selectable and composable by name from the edge config.

Filters run in the configured order, each on the updates no earlier filter flagged, so an update flagged by any
of them is flagged (then dropped or down-weighted, `filters.action`). The order matters where colluders would
shape a later filter's reference: the collusion check runs first, so the cosine filter's median is the honest
devices'. Scores of updates a filter did not see are NaN. One aggregator forms the aggregate of what is left.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge.filters.base import Verdict
from edge.filters.collusion import near_duplicates
from edge.filters.cosine import cosine_to_median
from edge.filters.krum import multi_krum
from edge.filters.mean import weighted_mean
from edge.filters.median import coordinate_median
from edge.filters.norm import norm_zscore
from edge.filters.trimmed_mean import trimmed_mean

FILTERS: dict[str, Callable[..., Verdict]] = {
    "collusion": near_duplicates,
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
    """Apply each named filter in order to the updates still unflagged; return (flags, verdict per filter)."""
    n = X.shape[0]
    flags = np.zeros(n, dtype=bool)
    verdicts: dict[str, Verdict] = {}
    for name in names:
        seen = np.flatnonzero(~flags)
        scores, own = np.full(n, np.nan), np.zeros(n, dtype=bool)
        if seen.size:
            verdict = FILTERS[name](X if seen.size == n else X[seen], **params.get(name, {}))
            scores[seen], own[seen] = verdict.scores, verdict.flags
        verdicts[name] = Verdict(scores=scores, flags=own)
        flags |= own
    return flags, verdicts
