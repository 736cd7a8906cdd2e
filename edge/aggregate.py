"""Close a round: weights -> filters -> (central DP) -> aggregate. One pure function over the round's rows.

Filters see a dense matrix of the coordinates any update touched (exact: untouched coordinates are zero in every
row and change no norm, dot product or median). When that matrix would exceed `max_cells` float32 cells, they see
a uniform random sample of those coordinates instead (norms and inner products scaled estimates; the norm filter's
z-score and the cosine are scale-free). Robust aggregators are coordinate-wise, so they run exactly, block by block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge import central_dp
from edge.filters import AGGREGATORS, FILTERS, Verdict, run_filters
from edge.rows import Rows
from edge.weighting import WeightingConfig, weights
from protocol.bounds import scale_to

ACTIONS = ("drop", "downweight")


@dataclass(frozen=True)
class FilterConfig:
    """The edge's [filters] table: which anomaly filters run, what befalls flagged updates, which aggregator is used."""

    enabled: list[str] = field(default_factory=lambda: ["collusion", "norm", "cosine"])
    action: str = "drop"             # "drop" flagged updates, or "downweight" them by `downweight`
    downweight: float = 0.1
    aggregator: str = "mean"         # "mean" | "trimmed_mean" | "median"
    min_updates: int = 4             # fewer updates than this: no filtering (statistics meaningless)
    max_cells: int = 50_000_000      # float32 cells a filter matrix may hold (200 MB)
    params: dict[str, dict] = field(default_factory=dict)  # per filter/aggregator keyword arguments

    def __post_init__(self) -> None:
        unknown = [n for n in self.enabled if n not in FILTERS]
        if unknown or self.action not in ACTIONS or self.aggregator not in AGGREGATORS:
            raise ValueError(f"filters: unknown {unknown or self.action or self.aggregator}; filters {list(FILTERS)},"
                             f" actions {ACTIONS}, aggregators {list(AGGREGATORS)}")
        if not 0.0 <= self.downweight <= 1.0 or self.max_cells < 1:
            raise ValueError("filters: need 0 <= downweight <= 1 and max_cells >= 1")


@dataclass(frozen=True)
class Meta:
    """Per-update columns of the round, aligned with the rows."""

    num_samples: np.ndarray
    losses: np.ndarray
    classes: list[str]
    staleness: np.ndarray       # sigma(s_i), 1 in synchronous rounds
    sample_weight: np.ndarray


@dataclass(frozen=True)
class Result:
    """A closed round's aggregate with the per-update weights, flags, verdicts and norms behind it (forward, logs)."""

    mean: np.ndarray            # float32 (d,)
    alpha: np.ndarray           # final weight per update (0 = not counted)
    flagged: np.ndarray         # bool per update
    verdicts: dict[str, Verdict]   # per filter: scores and its own flags
    norms: np.ndarray           # L2 norm of each update as aggregated (after the edge's bounds)
    weight_sum: float           # sum of alpha over counted updates
    num_clipped: int
    aggregator: str
    credited_var: float = 0.0   # per-coordinate variance of the devices' noise credited on the sum (distributed DP)


def filter_matrix(rows: Rows, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    """The dense matrix the filters score: the touched coordinates, or a random sample when over `max_cells`."""
    columns = rows.touched()
    budget = max(1, max_cells // max(rows.n, 1))
    if columns.shape[0] > budget:
        columns = np.sort(rng.choice(columns, size=budget, replace=False))
    return rows.dense(columns)


def robust_aggregate(rows: Rows, name: str, params: dict, max_cells: int) -> np.ndarray:
    """A coordinate-wise aggregator over all coordinates, in column blocks of at most max_cells cells."""
    fn = AGGREGATORS[name]
    block = max(1, max_cells // max(rows.n, 1))
    out = np.empty(rows.n_params, dtype=np.float64)
    for start in range(0, rows.n_params, block):
        stop = min(start + block, rows.n_params)
        out[start:stop] = fn(rows.column_block(start, stop), None, **params)
    return out


def aggregate(rows: Rows, meta: Meta, wcfg: WeightingConfig, fcfg: FilterConfig, clip: float = 0.0,
              noise_mult: float = 0.0, rng: np.random.Generator | None = None,
              noise: np.ndarray | None = None, factors: np.ndarray | None = None,
              credited: np.ndarray | None = None) -> Result:
    """Aggregate a round. With central DP (clip > 0) the aggregator is always the weighted mean of the updates
    that survived the filters (the only one whose sensitivity is bounded, see edge.central_dp). `factors` scale
    the rows after the filters saw them as received (edge.bounds: an outsized update is still flagged)."""
    rng = rng if rng is not None else np.random.default_rng()
    alpha = weights(meta.num_samples, meta.losses, meta.classes, meta.staleness, meta.sample_weight, wcfg)
    flagged = np.zeros(rows.n, dtype=bool)
    verdicts: dict[str, Verdict] = {}
    if fcfg.enabled and rows.n >= fcfg.min_updates:
        flagged, verdicts = run_filters(filter_matrix(rows, fcfg.max_cells, rng), fcfg.enabled, fcfg.params)
    if factors is not None:
        rows = rows.scaled(factors)
    norms = rows.norms()
    robust = fcfg.aggregator != "mean" and clip <= 0
    keep_factor = 0.0 if (fcfg.action == "drop" or robust) else fcfg.downweight
    alpha = np.where(flagged, alpha * keep_factor, alpha)
    counted = alpha > 0
    weight_sum = float(alpha.sum())
    num_clipped, credited_var = 0, 0.0
    if not counted.any():
        mean = np.zeros(rows.n_params)
    elif clip > 0:
        omega = alpha / alpha.max()
        if credited is not None:   # distributed DP: the devices clipped before their noise (edge.central_dp)
            credited_var = float(np.sum((omega * credited) ** 2))
            mean = central_dp.noisy_mean(rows.weighted_sum(omega), float(omega.sum()), clip,
                                         central_dp.top_up(noise_mult, clip, credited_var), noise)
        else:
            factors = scale_to(norms, clip)
            num_clipped = int(((factors < 1.0) & counted).sum())
            mean = central_dp.noisy_mean(rows.weighted_sum(omega * factors), float(omega.sum()), clip, noise_mult,
                                         noise)
    elif robust:
        mean = robust_aggregate(rows.take(counted), fcfg.aggregator, fcfg.params.get(fcfg.aggregator, {}),
                                fcfg.max_cells)
    else:
        mean = rows.weighted_sum(alpha) / weight_sum
    return Result(mean=mean.astype(np.float32), alpha=alpha, flagged=flagged, verdicts=verdicts, norms=norms,
                  weight_sum=weight_sum, num_clipped=num_clipped, aggregator="mean" if not robust else
                  fcfg.aggregator, credited_var=credited_var)


def relative_change(new: np.ndarray, last: np.ndarray | None) -> float:
    """||new - last|| / ||last|| (relative L2 norm); inf when nothing was forwarded before (or it was zero)."""
    if last is None or last.shape != new.shape:
        return float("inf")
    base = float(np.linalg.norm(last))
    diff = float(np.linalg.norm(new.astype(np.float64) - last))
    return diff / base if base > 0 else (float("inf") if diff > 0 else 0.0)
