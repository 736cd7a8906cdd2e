"""Heterogeneity-aware aggregation weights.

    alpha_i = w_i * n_i^a * exp(-gamma * max(0, z_i)) * c[class_i] * sigma(s_i)

- w_i: the cloud's per-device `sample_weight` from the round announcement (1 / (N p_i) for importance-sampled
  cohorts, keeps the estimate unbiased); 1 when absent or when `use_sample_weight` is off;
- n_i: the update's `num_samples` (data volume), exponent a = `sample_exponent` (1: proportional, 0.5: damped);
- z_i: robust z-score (median/MAD) of the reported training loss across the round's updates; gamma =
  `loss_gamma` down-weights devices whose loss is atypically high (quality signal), never up-weights;
- c[class]: `class_factors` per compute class (e.g. trust a "server" more than a "wearable"); 1 when unlisted;
- sigma(s_i): the staleness weight of edge.rounds (1 in synchronous rounds).

FedAvg is the special case a = 1, gamma = 0, no class factors, no staleness, w = 1: alpha_i = n_i.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge.filters.base import robust_z


@dataclass(frozen=True)
class WeightingConfig:
    """The edge's [weighting] table: the exponent and factors of the aggregation weight alpha_i (module docstring)."""

    sample_exponent: float = 1.0
    loss_gamma: float = 0.0
    class_factors: dict[str, float] = field(default_factory=dict)
    use_sample_weight: bool = True


def weights(num_samples: np.ndarray, losses: np.ndarray, classes: list[str], staleness: np.ndarray,
            sample_weight: np.ndarray, cfg: WeightingConfig) -> np.ndarray:
    """alpha (n,) float64 as in the module docstring; all inputs are per-update arrays of length n."""
    n = np.asarray(num_samples, dtype=np.float64)
    alpha = n ** cfg.sample_exponent if cfg.sample_exponent != 0 else np.ones_like(n)
    alpha = np.where(n > 0, alpha, 0.0)
    if cfg.loss_gamma:
        alpha = alpha * np.exp(-cfg.loss_gamma * np.maximum(0.0, robust_z(losses)))
    if cfg.class_factors:
        alpha = alpha * np.array([cfg.class_factors.get(c, 1.0) for c in classes], dtype=np.float64)
    if cfg.use_sample_weight:
        alpha = alpha * np.asarray(sample_weight, dtype=np.float64)
    return alpha * np.asarray(staleness, dtype=np.float64)
