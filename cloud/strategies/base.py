"""The strategy interface: what a round asks of devices and edges, and how the server turns edge results into a model.

A strategy is a pair of pure functions over plain data (Flower style): `configure_round` decides the announcement
(plan, compression, cohort, per-device lr_scale and sample_weight, central DP) and `apply` maps the server state and
the decoded edge aggregates of one round to the next server state. The daemon owns all I/O around them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from cloud.strategies.server_opt import ServerOptimizer
from protocol.messages import CentralDPReport, TrainingPlan


@dataclass(frozen=True)
class RoundDefaults:
    """The configured round parameters a strategy starts from (configs/cloud.toml [plan], [compression], ...)."""

    plan: TrainingPlan
    compression: dict
    central_dp: CentralDPReport | None
    round_seconds: float = 60.0


@dataclass(frozen=True)
class RoundConfig:
    """What one RoundAnnouncement asks (everything but ids, versions and the deadline)."""

    plan: TrainingPlan
    compression: dict
    cohort: list[str] = field(default_factory=list)          # [] = every device
    lr_scale: dict[str, float] = field(default_factory=dict)
    sample_weight: dict[str, float] = field(default_factory=dict)
    central_dp: CentralDPReport | None = None


@dataclass
class DeviceInfo:
    """What the cloud knows about a device, learned from edge aggregates and retained device statuses."""

    device_id: str
    compute_class: str = "unknown"
    steps_per_s: float = 0.0
    norm: float = 0.0        # running mean of the device's update L2 norm (0 = never seen)
    quality: float = 1.0     # running fraction of its updates NOT flagged by the edges' filters
    rounds: int = 0          # rounds it was part of an aggregate
    state: str = ""          # its last DeviceStatus state ("online", "budget_exhausted", "offline", ...)
    agreement: float = 0.0   # mean cosine of its update sketches to the device majority (cloud.trust.agree)
    verdicts: int = 0        # rounds that mean is over


@dataclass(frozen=True)
class EdgeResult:
    """One decoded EdgeAggregate. `delta` is the edge's weighted MEAN delta; None when not significant."""

    edge_id: str
    delta: np.ndarray | None
    num_samples: int
    weight_sum: float
    num_devices: int
    mean_local_steps: float = 0.0
    control_delta: np.ndarray | None = None


@dataclass
class ServerState:
    """The global weights plus the strategy's named arrays (Adam moments, SCAFFOLD's c), all checkpointed."""

    weights: np.ndarray
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def replace(self, **changes) -> ServerState:
        return dataclasses.replace(self, **changes)


def weighted_mean(results: list[EdgeResult], weights: list[float], n_params: int) -> np.ndarray:
    """Sum_e w_e d_e / Sum_e w_e; a non-significant edge counts as a zero delta (it said "about nothing changed")."""
    total = float(sum(weights))
    out = np.zeros(n_params, np.float64)
    if total <= 0:
        return out.astype(np.float32)
    for result, w in zip(results, weights):
        if result.delta is not None and w > 0:
            out += (w / total) * result.delta.astype(np.float64)
    return out.astype(np.float32)


class Strategy:
    """FedAvg-shaped base: announce the configured round to everyone, combine by num_samples, then one step of the
    server optimiser (plain `w += server_lr * d` by default; momentum, Adam or Yogi with `server_optimizer`)."""

    name = "base"

    def __init__(self, defaults: RoundDefaults, server_lr: float = 1.0, server_optimizer: str = "sgd",
                 server_momentum: float = 0.9, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.defaults = defaults
        self.optimizer = ServerOptimizer(server_optimizer, float(server_lr), server_momentum, beta1, beta2, tau)

    def init_state(self, weights: np.ndarray) -> ServerState:
        weights = np.asarray(weights, np.float32).copy()
        return ServerState(weights, self.optimizer.init(weights))

    def plan(self) -> TrainingPlan:
        return self.defaults.plan

    def configure_round(self, state: ServerState, round_id: int, devices: Mapping[str, DeviceInfo],
                        rng: np.random.Generator) -> RoundConfig:
        return RoundConfig(self.plan(), dict(self.defaults.compression), central_dp=self.defaults.central_dp)

    def combine(self, results: list[EdgeResult], n_params: int) -> np.ndarray:
        return weighted_mean(results, [float(r.num_samples) for r in results], n_params)

    def per_edge_inputs(self) -> list[str]:
        """What this strategy needs from each edge beyond the sample-weighted sum of their mean deltas: under
        edge-level secure aggregation the cloud sees only that sum, so a non-empty list refuses the setup."""
        return []

    def apply(self, state: ServerState, results: list[EdgeResult], population: int) -> ServerState:
        """`population`: how many devices the federation has (SCAFFOLD scales its control update by |S|/N)."""
        weights, arrays = self.optimizer.step(state.weights, self.combine(results, state.weights.size), state.arrays)
        return state.replace(weights=weights, arrays={**state.arrays, **arrays})
