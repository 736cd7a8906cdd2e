"""Federated standardisation: per-site sufficient statistics -> one transform every tier applies the same way.

A tabular model needs its features on one scale (a cholesterol of ~240 next to 0/1 flags leaves SGD predicting one
class). Nobody may pool the rows to compute that scale, so each site sends only aggregated statistics of its rows and
the federation computes the pooled mean and variance from them:

- `FeatureSchema`: which raw columns are numeric and which are categorical (one-hot over declared levels), i.e.
  the order and meaning of the model's inputs. `encode` turns raw cells into a float matrix with NaN for missing.
- `site_summary(x)` -> a vector of PER-ROW AVERAGES of sufficient statistics, 3 per feature: the observed
  fraction, the mean of the observed values' sum, the mean of their squares (a missing value contributes 0 to all
  three). Its federated mean weighted by row count, which is exactly what the edge's FedAvg weighting
  (alpha_i = num_samples) and the cloud's sample-weighted mean compute, is the pooled per-row average: sum_i n_i
  s_i / sum_i n_i = (sum over all rows) / N. `FeatureTransform.from_summary` turns it into mean and variance.
  A statistics round is therefore an ordinary aggregation round whose "delta" is this vector (docs/protocol.md,
  "Statistics rounds"): no new message, and secure aggregation (which sums) and central DP (a noisy weighted mean)
  apply to it unchanged.
- With declared `bounds` (lo, hi) per feature, values are first mapped to u = (clip(x) - lo) / (hi - lo) in
  [0, 1]: every coordinate of a site's vector then lies in [0, 1], one record changes the site's TOTALS by at most
  sqrt(3 F) in L2 (the sensitivity of the Gaussian mechanism `site_summary(..., noise_mult=z)` adds to the totals),
  and a secure-aggregation clip of 1 per coordinate covers it. Without bounds, no DP noise can be calibrated (a
  value is unbounded) and `site_summary` refuses noise.
- Optional second round: `site_histogram(x, transform)` -> per-row-average histogram of each feature's z-score over
  fixed bins; the pooled histogram gives approximate quantiles (`with_quantile_clip`), which become clipping bounds
  in the transform. Min/max are not offered: they are single records' values, which no aggregation hides.
- `FeatureTransform.apply(x)`: clip to the quantile bounds (if any), z-score, missing -> 0 (the pooled mean), clip
  |z| to `clip_z` (if > 0). `to_dict` / `from_dict`: the JSON form stored in a model bundle's signed manifest
  (`"features"`), so a device's inference and training read their CSV through the same transform as the cloud.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from protocol.errors import ProtocolError, Reason
from protocol.tabular import ReadOptions, Table, TableError, is_numeric, numeric_column, parse_number

FORMAT = "fediomt-features/1"
STATISTICS_MODEL = "feature-statistics"   # the model name of a statistics round's announcement and zero "model"
HIST_RANGE = 6.0          # histogram bins cover z in [-6, 6] (plus one under- and one overflow bin)
HIST_BINS = 48
MAX_LEVELS = 32           # a categorical column with more levels is refused (an identifier or free text)


@dataclass(frozen=True)
class FeatureSchema:
    """The model's inputs: numeric columns as they are, categorical columns one-hot over their declared levels."""

    numeric: tuple[str, ...]
    categorical: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def names(self) -> list[str]:
        return list(self.numeric) + [f"{c}={level}" for c, levels in self.categorical for level in levels]

    @property
    def n_features(self) -> int:
        return len(self.numeric) + sum(len(levels) for _, levels in self.categorical)

    @classmethod
    def infer(cls, table: Table, exclude: Sequence[str] = (), options: ReadOptions = ReadOptions(),
              categorical: str = "onehot", max_levels: int = MAX_LEVELS) -> FeatureSchema:
        """Numeric where at least half of the non-missing cells are numbers (a stray non-number in it is a
        TableError naming its row, when encoding); otherwise categorical: one-hot over the sorted levels
        (`categorical="onehot"`, at most `max_levels`), or a TableError naming the column (`"reject"`)."""
        numeric, cats = [], []
        for name in table.columns:
            if name in exclude:
                continue
            present = [c for c in table.column(name) if c not in options.missing]
            numbers = sum(parse_number(c, options) is not None for c in present)
            if is_numeric(table, name, options) or numbers >= 0.5 * len(present):
                numeric.append(name)
                continue
            bad = next((r, c) for r, c in enumerate(table.column(name), start=2)
                       if parse_number(c, options) is None)
            levels = sorted({c for c in table.column(name) if c not in options.missing})
            if categorical != "onehot":
                raise TableError(table.path, f"categorical column ({bad[1]!r} is not a number); drop it or allow "
                                             "one-hot encoding (categorical = onehot)", name, bad[0])
            if len(levels) > max_levels:
                raise TableError(table.path, f"{len(levels)} distinct non-numeric values (> {max_levels}): an "
                                             f"identifier or free text, not a category; drop the column", name,
                                 bad[0])
            cats.append((name, tuple(levels)))
        if not numeric and not cats:
            raise TableError(table.path, "no feature columns left")
        return cls(tuple(numeric), tuple(cats))

    def encode(self, table: Table, options: ReadOptions = ReadOptions()) -> np.ndarray:
        """(rows, n_features) float64, NaN for a missing numeric cell; a missing category is all zeros; a level not
        in the schema is a TableError (the federation agreed on the levels)."""
        cols = [np.array(numeric_column(table, name, options), np.float64) for name in self.numeric]
        for name, levels in self.categorical:
            cells = table.column(name)
            for row, cell in enumerate(cells, start=2):
                if cell not in levels and cell not in options.missing:
                    raise TableError(table.path, f"category {cell!r} is not one of the federation's levels "
                                                 f"{list(levels)}", name, row)
            cols += [np.array([c == level for c in cells], np.float64) for level in levels]
        return np.stack(cols, axis=1) if cols else np.zeros((len(table.rows), 0))

    def to_dict(self) -> dict:
        return {"numeric": list(self.numeric), "categorical": [[c, list(lv)] for c, lv in self.categorical]}

    @classmethod
    def from_dict(cls, d: Mapping) -> FeatureSchema:
        return cls(tuple(str(c) for c in d["numeric"]),
                   tuple((str(c), tuple(str(v) for v in lv)) for c, lv in d.get("categorical", [])))


def _unit(x: np.ndarray, bounds: np.ndarray | None) -> np.ndarray:
    if bounds is None:
        return x
    lo, hi = bounds[:, 0], bounds[:, 1]
    return (np.clip(x, lo, hi) - lo) / (hi - lo)


def check_bounds(bounds, n_features: int) -> np.ndarray | None:
    if bounds is None:
        return None
    b = np.asarray(bounds, np.float64).reshape(n_features, 2)
    if not np.all(np.isfinite(b)) or np.any(b[:, 1] <= b[:, 0]):
        raise ValueError("feature bounds need finite lo < hi for every feature")
    return b


def summary_size(n_features: int) -> int:
    return 3 * n_features


def site_summary(x: np.ndarray, bounds=None, noise_mult: float = 0.0,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
    """(per-row averages [observed fraction, sum, sum of squares] per feature, float64; the row count). With
    `noise_mult` > 0 (needs `bounds`), Gaussian noise of std noise_mult * sqrt(3 F) is added to the totals first:
    one record's L2 sensitivity on the bounded totals (module docstring)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError("site_summary needs a non-empty (rows, features) matrix")
    b = check_bounds(bounds, x.shape[1])
    u = _unit(x, b)
    seen = ~np.isnan(u)
    v = np.where(seen, u, 0.0)
    totals = np.concatenate([seen.sum(0), v.sum(0), (v * v).sum(0)]).astype(np.float64)
    if noise_mult > 0:
        if b is None:
            raise ValueError("DP noise on feature statistics needs declared bounds (lo, hi) per feature")
        rng = rng if rng is not None else np.random.default_rng()
        totals = totals + noise_mult * math.sqrt(totals.size) * rng.standard_normal(totals.size)
    return totals / len(x), len(x)


def masked_statistics_scale(features: str) -> int:
    """`site_rows_max` of a masked statistics round's announced features (JSON): each site masks its totals divided
    by it, so every value lies in [0, 1] on the secure-aggregation grid. ProtocolError when absent or invalid."""
    try:
        scale = json.loads(features)["site_rows_max"]
    except (ValueError, KeyError, TypeError):
        scale = None
    if type(scale) is not int or not 0 < scale < 1 << 24:
        raise ProtocolError(Reason.BAD_VALUE, "a masked statistics round needs site_rows_max, an integer in "
                                              "[1, 2^24) (the largest site's rows)")
    return scale


def pool(summaries: Sequence[tuple[np.ndarray, int]]) -> tuple[np.ndarray, int]:
    """The row-weighted mean of per-site summaries (what the edge and cloud compute; for tests and tools)."""
    n = sum(int(c) for _, c in summaries)
    return sum(np.asarray(s, np.float64) * c for s, c in summaries) / n, n


@dataclass(frozen=True)
class FeatureTransform:
    """The federation's feature transform (module docstring). Means and stds are per model input."""

    schema: FeatureSchema
    mean: tuple[float, ...]
    std: tuple[float, ...]
    count: int                                      # rows the statistics came from
    clip_z: float = 0.0                             # |z| cap after standardisation, 0 = none
    lower: tuple[float, ...] | None = None          # per-feature clipping bounds (raw units) from quantiles
    upper: tuple[float, ...] | None = None
    provenance: dict = field(default_factory=dict)  # how the statistics were computed (sites, DP, secagg)

    @classmethod
    def from_summary(cls, schema: FeatureSchema, pooled: np.ndarray, count: int, bounds=None, clip_z: float = 0.0,
                     provenance: dict | None = None) -> FeatureTransform:
        f = schema.n_features
        pooled = np.asarray(pooled, np.float64)
        if pooled.shape != (3 * f,):
            raise ValueError(f"feature statistics: {pooled.size} values for {f} features (expected {3 * f})")
        seen, s1, s2 = pooled[:f], pooled[f:2 * f], pooled[2 * f:]
        seen_pos = np.maximum(seen, 1e-12)
        mean = np.where(seen > 1e-9, s1 / seen_pos, 0.0)
        var = np.maximum(np.where(seen > 1e-9, s2 / seen_pos - mean**2, 1.0), 0.0)
        std = np.sqrt(var)
        b = check_bounds(bounds, f)
        if b is not None:   # back from the unit scale
            mean, std = b[:, 0] + (b[:, 1] - b[:, 0]) * mean, (b[:, 1] - b[:, 0]) * std
        std = np.where(std > 1e-9, std, 1.0)
        return cls(schema, tuple(float(v) for v in mean), tuple(float(v) for v in std), int(count), float(clip_z),
                   provenance=dict(provenance or {}))

    @property
    def n_features(self) -> int:
        return self.schema.n_features

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Raw features (NaN = missing) -> the model's float32 inputs."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"features: got shape {x.shape}, the transform expects (rows, {self.n_features})")
        if self.lower is not None and self.upper is not None:
            x = np.clip(x, np.asarray(self.lower), np.asarray(self.upper))
        z = np.nan_to_num((x - np.asarray(self.mean)) / np.asarray(self.std), nan=0.0, posinf=0.0, neginf=0.0)
        if self.clip_z > 0:
            z = np.clip(z, -self.clip_z, self.clip_z)
        return z.astype(np.float32)

    def transform_table(self, table: Table, options: ReadOptions = ReadOptions()) -> np.ndarray:
        return self.apply(self.schema.encode(table, options))

    def with_quantile_clip(self, pooled_hist: np.ndarray, q: float = 0.005) -> FeatureTransform:
        """Clip each feature at its pooled q and 1 - q quantiles (from `site_histogram`'s pooled vector)."""
        lo, hi = quantiles(pooled_hist, self.n_features, (q, 1.0 - q))
        mean, std = np.asarray(self.mean), np.asarray(self.std)
        return FeatureTransform(self.schema, self.mean, self.std, self.count, self.clip_z,
                                tuple(float(v) for v in mean + lo * std), tuple(float(v) for v in mean + hi * std),
                                dict(self.provenance, quantile_clip=q))

    def to_dict(self) -> dict:
        d = {"format": FORMAT, "schema": self.schema.to_dict(), "mean": list(self.mean), "std": list(self.std),
             "count": self.count, "clip_z": self.clip_z, "provenance": dict(self.provenance)}
        if self.lower is not None:
            d["lower"], d["upper"] = list(self.lower), list(self.upper)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> FeatureTransform:
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ValueError(f"not a feature transform (format {FORMAT!r} expected)")
        schema = FeatureSchema.from_dict(d["schema"])
        mean, std = tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        if len(mean) != schema.n_features or len(std) != schema.n_features or min(std, default=1.0) <= 0:
            raise ValueError("feature transform: mean/std do not match the schema")
        lower = tuple(float(v) for v in d["lower"]) if "lower" in d else None
        upper = tuple(float(v) for v in d["upper"]) if "upper" in d else None
        return cls(schema, mean, std, int(d["count"]), float(d.get("clip_z", 0.0)), lower, upper,
                   dict(d.get("provenance", {})))


def _bin_edges() -> np.ndarray:
    return np.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1)


def histogram_size(n_features: int) -> int:
    return n_features * (HIST_BINS + 2)


def site_histogram(x: np.ndarray, transform: FeatureTransform, noise_mult: float = 0.0,
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
    """(per-row-average counts of each feature's z-score in [under, bins..., over], the row count): the second,
    optional statistics round; missing values are not counted. One record adds 1 to at most one bin per feature,
    so its L2 influence on the counts is sqrt(F): with `noise_mult` > 0, Gaussian noise of std noise_mult * sqrt(F)
    is added to the counts first."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) == 0 or x.shape[1] != transform.n_features:
        raise ValueError(f"site_histogram needs a non-empty (rows, {transform.n_features}) matrix")
    z = (x - np.asarray(transform.mean)) / np.asarray(transform.std)
    edges = _bin_edges()
    out = np.zeros((x.shape[1], HIST_BINS + 2))
    for j in range(x.shape[1]):
        col = z[:, j][~np.isnan(z[:, j])]
        idx = np.searchsorted(edges, col, side="right")       # 0 = under, HIST_BINS + 1 = over
        out[j] = np.bincount(idx, minlength=HIST_BINS + 2)[: HIST_BINS + 2]
    counts = out.ravel()
    if noise_mult > 0:
        rng = rng if rng is not None else np.random.default_rng()
        counts = counts + noise_mult * math.sqrt(x.shape[1]) * rng.standard_normal(counts.size)
    return counts / len(x), len(x)


def quantiles(pooled_hist: np.ndarray, n_features: int, qs: Sequence[float]) -> list[np.ndarray]:
    """Approximate z-quantiles per feature from a pooled histogram (linear inside a bin; the open end bins are
    placed at +-HIST_RANGE)."""
    h = np.maximum(np.asarray(pooled_hist, np.float64).reshape(n_features, HIST_BINS + 2), 0.0)
    edges = _bin_edges()
    lefts = np.concatenate([[-HIST_RANGE], edges[:-1], [HIST_RANGE]])
    widths = np.concatenate([[0.0], np.diff(edges), [0.0]])
    out = []
    for q in qs:
        vals = np.zeros(n_features)
        for j in range(n_features):
            total = h[j].sum()
            if total <= 0:
                vals[j] = -HIST_RANGE if q < 0.5 else HIST_RANGE
                continue
            cum = np.cumsum(h[j]) / total
            k = int(np.searchsorted(cum, q))
            k = min(k, len(cum) - 1)
            before = cum[k - 1] if k > 0 else 0.0
            frac = (q - before) / max(cum[k] - before, 1e-12)
            vals[j] = lefts[k] + min(max(frac, 0.0), 1.0) * widths[k]
        out.append(vals)
    return out
