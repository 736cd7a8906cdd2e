"""The cloud's trust gate: an edge whose aggregate points away from the cloud's own update is not applied.

An edge's filters and bounds are statistics over its own devices, so attackers holding a majority of one edge own
them, and with two edges the cloud has no majority to compare against (EXPERIMENTS.md "Poisoning"). FLTrust (Cao
et al., NDSS 2021) bootstraps trust from a small clean root set the server holds: each round the cloud trains the
current global model on it for the devices' local work (plain SGD, no DP: the root set is consented or public
data, never a device's), and an edge result whose cosine to that root update is <= `min_cosine` is left out of the
round (its devices' privacy spend is still accounted). FLTrust also rescales every update to the root update's
norm and weights it by ReLU(cosine); the edge bounds (cloud.rounds.bound_edges) already cap norms, so the gate
keeps the strategy's weights and only removes edges that would pull the model backwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud.strategies.base import EdgeResult
from protocol.messages import TrainingPlan


@dataclass(frozen=True)
class TrustConfig:
    """`[trust]` of cloud.toml."""

    root_data: Path | None = None  # the cloud's clean root set (NPZ x, y; consented or public data); None = no gate
    min_cosine: float = 0.0        # an edge result with cosine <= this to the root update is not applied
    lr_factor: float = 1.0         # the root update's learning rate, as a factor of the round's device lr

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_cosine < 1.0 or not self.lr_factor > 0:
            raise ValueError("[trust] needs -1 <= min_cosine < 1 and lr_factor > 0")


@dataclass(frozen=True)
class TrustGate:
    """What the engine needs: the root update of given weights under the round's plan, and the threshold."""

    reference: Callable[[np.ndarray, TrainingPlan], np.ndarray]
    min_cosine: float = 0.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 and math.isfinite(na * nb) else 0.0


def gate(results: Sequence[EdgeResult], reference: np.ndarray, min_cosine: float
         ) -> tuple[list[EdgeResult], dict[str, float]]:
    """(the results to apply, {edge: cosine} of those left out). A result without a delta (no devices) passes; a
    zero root update (nothing to compare with) keeps every result."""
    if not np.any(reference):
        return list(results), {}
    kept, dropped = [], {}
    for r in results:
        c = None if r.delta is None else cosine(r.delta, reference)
        if c is not None and c <= min_cosine:
            dropped[r.edge_id] = round(c, 4)
        else:
            kept.append(r)
    return kept, dropped


def root_gate(model, x: np.ndarray, y: np.ndarray, cfg: TrustConfig, rng: np.random.Generator) -> TrustGate:
    """A TrustGate whose reference is `model` (a device.runtime.TrainableModel) trained on the root set (x, y) from
    the given weights with the devices' round (device.training.train_round: the same local epochs and batch),
    without clipping or noise."""
    from device.training import planned_steps, train_round

    if len(x) < model.batch_size:
        raise ValueError(f"[trust] root_data: {len(x)} rows, fewer than one batch of {model.batch_size}")

    def reference(weights: np.ndarray, plan: TrainingPlan) -> np.ndarray:
        clean = TrainingPlan(lr=plan.lr * cfg.lr_factor, local_epochs=plan.local_epochs, batch_size=model.batch_size,
                             clip=1e9, noise_mult=0.0, max_steps=plan.max_steps)
        steps = planned_steps(clean, len(x), model.batch_size)
        return train_round(model, x, y, weights, clean, steps, rng).delta

    return TrustGate(reference, cfg.min_cosine)
