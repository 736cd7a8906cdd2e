"""FedIoMT: hierarchical, heterogeneity-aware, compressed, two-level-DP federated averaging.

Hierarchical: edges pre-aggregate their devices (and add user-level central DP, asked for here in `central_dp`);
compressed: devices send sparse quantised deltas with error feedback (the `compression` settings); two-level DP:
example-level DP-SGD on devices (the plan's clip/noise_mult) plus the edges' central noise, both accounted in
cloud.accounting. On top, each switchable for ablations (cloud.strategies.heterogeneity):
`importance_sampling` (cohort of `cohort_size` devices drawn by update norm, sample_weight = 1/(N pi_i), and the
edges' means combined by their weight_sum, which carries those weights), `adaptive_lr` (lr_scale from compute class
and data quality), `adaptive_steps` (plan.max_steps from the deadline and the devices' speed) and `fednova`
(edge means normalised by their mean local steps). `lr_decay_rounds` > 0 anneals the announced device learning rate
along a half cosine from plan.lr (round 1) to `lr_floor` * plan.lr (round `lr_decay_rounds`, and after): under
device DP-SGD the noise in the global model scales with the step size, so small late steps average it out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from cloud.strategies.base import (
    DeviceInfo,
    EdgeResult,
    RoundConfig,
    RoundDefaults,
    ServerState,
    Strategy,
    weighted_mean,
)
from cloud.strategies.heterogeneity import deadline_steps, fednova_combine, importance_sample, lr_scales


def cosine_lr_factor(round_id: int, rounds: int, floor: float) -> float:
    """1 at round 1, `floor` from round `rounds` on, a half cosine in between; 1 throughout when rounds <= 1."""
    if rounds <= 1:
        return 1.0
    t = min(1.0, max(0.0, (round_id - 1) / (rounds - 1)))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


class FedIoMT(Strategy):
    """The project's strategy: FedAvg plus importance-sampled cohorts, adaptive lr/steps, FedNova (each switchable)."""

    name = "fediomt"

    def __init__(self, defaults: RoundDefaults, importance_sampling: bool = True,
                 cohort_size: int = 0, uniform_mix: float = 0.2, adaptive_lr: bool = True,
                 class_lr: Mapping[str, float] | None = None, min_quality: float = 0.2, adaptive_steps: bool = True,
                 step_time_fraction: float = 0.5, fednova: bool = True, lr_decay_rounds: int = 0,
                 lr_floor: float = 0.1, **server) -> None:
        super().__init__(defaults, **server)
        if cohort_size < 0 or not 0 <= uniform_mix <= 1 or not 0 < step_time_fraction <= 1:
            raise ValueError("need cohort_size >= 0, 0 <= uniform_mix <= 1, 0 < step_time_fraction <= 1")
        if lr_decay_rounds < 0 or not 0 < lr_floor <= 1:
            raise ValueError("need lr_decay_rounds >= 0 and 0 < lr_floor <= 1")
        self.importance_sampling, self.cohort_size, self.uniform_mix = importance_sampling, cohort_size, uniform_mix
        self.adaptive_lr, self.class_lr = adaptive_lr, dict(class_lr or {})
        self.min_quality = min_quality
        self.adaptive_steps, self.step_time_fraction = adaptive_steps, step_time_fraction
        self.fednova = fednova
        self.lr_decay_rounds, self.lr_floor = int(lr_decay_rounds), float(lr_floor)

    def configure_round(self, state: ServerState, round_id: int, devices: Mapping[str, DeviceInfo],
                        rng: np.random.Generator) -> RoundConfig:
        plan, central_dp = self.defaults.plan, self.defaults.central_dp
        if self.lr_decay_rounds:
            plan = dataclasses.replace(plan, lr=plan.lr * cosine_lr_factor(round_id, self.lr_decay_rounds,
                                                                            self.lr_floor))
        cohort, sample_weight = [], {}
        sampling = self.importance_sampling and 0 < self.cohort_size < len(devices)
        if sampling:
            cohort, sample_weight = importance_sample(devices, self.cohort_size, rng, self.uniform_mix)
            if central_dp is not None:
                central_dp = dataclasses.replace(central_dp, sampling_rate=min(1.0, self.cohort_size / len(devices)))
        members = [devices[d] for d in cohort] if sampling else list(devices.values())
        if self.adaptive_steps:
            steps = deadline_steps((d.steps_per_s for d in members), self.defaults.round_seconds,
                                   self.step_time_fraction)
            if steps:
                plan = dataclasses.replace(plan, max_steps=min(steps, plan.max_steps) if plan.max_steps else steps)
        lr_scale = lr_scales(members, self.class_lr, self.min_quality) if self.adaptive_lr else {}
        return RoundConfig(plan, dict(self.defaults.compression), cohort, lr_scale, sample_weight, central_dp)

    def per_edge_inputs(self) -> list[str]:
        return [why for on, why in (
            (self.fednova, "fednova = true: each edge's mean local steps"),
            (self.importance_sampling, "importance_sampling = true: each device's update norm and the edges' "
                                       "weight_sum")) if on]

    def combine(self, results: list[EdgeResult], n_params: int) -> np.ndarray:
        weights = [r.weight_sum if self.importance_sampling else float(r.num_samples) for r in results]
        if self.fednova:
            return fednova_combine(results, weights, n_params)
        return weighted_mean(results, weights, n_params)
