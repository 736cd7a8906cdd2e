"""The cloud's trust gates: an edge whose aggregate points away from a reference is not applied.

An edge's filters and bounds are statistics over its own devices, so attackers holding a majority of one edge own
them, and with two edges the cloud has no majority of edges to compare against (EXPERIMENTS.md "Poisoning").

The device-majority gate (the default): the reference is the coordinate-wise median of the direction sketches of
every device update the edges admitted this round (protocol.sketch), so an edge that attackers hold a majority of
is compared with what most devices of the whole federation agree on. It needs no data at the cloud, only honest
devices in the majority across edges and at least two edges that sent sketches; the cloud sees each device's
update direction to about 1/sqrt(k) (k = 64 by default), which is why edges send no sketches under central DP.
Under device DP-SGD the directions are mostly noise (as the root gate measured) and the gate stays off.

The root gate (`[trust] root_data`, used instead): FLTrust (Cao et al., NDSS 2021) bootstraps trust from a small
clean root set the server holds: each round the cloud trains the current global model on it for the devices'
local work (plain SGD, no DP: the root set is consented or public data, never a device's), and an edge result whose
cosine to that root update is <= `min_cosine` is left out of the round. FLTrust also rescales every update to the
root update's norm and weights it by ReLU(cosine); the edge bounds (cloud.rounds.bound_edges) already cap norms, so
the gates keep the strategy's weights and only remove edges that would pull the model backwards. A left-out edge's
devices' privacy spend is still accounted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cloud.strategies.base import DeviceInfo, EdgeResult
from protocol.messages import TrainingPlan
from protocol.sketch import sketch

MIN_VERDICTS = 2   # rounds of device verdicts before a device's mean agreement can take its weight


@dataclass(frozen=True)
class TrustConfig:
    """`[trust]` of cloud.toml."""

    root_data: Path | None = None  # the cloud's clean root set (NPZ x, y; consented or public data); None = no root
                                   # gate
    min_cosine: float = 0.0        # an edge result with cosine <= this to the reference is not applied
    device_majority: bool = True   # without root_data: gate on the edges' device sketches (protocol.sketch)
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
    return leave_out(results, {r.edge_id: cosine(r.delta, reference) for r in results if r.delta is not None},
                     min_cosine)


def leave_out(results: Sequence[EdgeResult], cosines: Mapping[str, float], min_cosine: float
              ) -> tuple[list[EdgeResult], dict[str, float]]:
    """(the results whose cosine is above min_cosine or unknown, {edge: cosine} of those left out)."""
    kept, dropped = [], {}
    for r in results:
        c = cosines.get(r.edge_id)
        if c is not None and c <= min_cosine:
            dropped[r.edge_id] = round(c, 4)
        else:
            kept.append(r)
    return kept, dropped


def majority_direction(sketches: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The coordinate-wise median of every edge's device sketches (protocol.sketch.decode_sketches rows): what most
    devices of the federation agree on. None with fewer than two edges' sketches (one edge's own devices cannot
    outvote it) or a zero median."""
    if sum(len(rows) > 0 for rows in sketches.values()) < 2:
        return None
    reference = np.median(np.concatenate([rows for rows in sketches.values() if len(rows)]), axis=0)
    return reference if np.any(reference) else None


def sketch_cosines(results: Sequence[EdgeResult], reference: np.ndarray | None, dims: int) -> dict[str, float]:
    """{edge: cosine of its result's sketch to the majority direction}: the device-majority gate's verdicts."""
    if reference is None:
        return {}
    return {r.edge_id: cosine(sketch(r.delta, dims), reference) for r in results if r.delta is not None}


def device_cosines(rows: np.ndarray, ids: Sequence[str], reference: np.ndarray | None) -> dict[str, float]:
    """{device: cosine} of each device's own sketch (rows, in `ids` order) to the majority direction: the
    device-majority gate's per-device verdicts. {} when the rows and ids disagree; a zero row has no verdict."""
    if reference is None or len(rows) != len(ids):
        return {}
    norms = np.linalg.norm(rows, axis=1)
    cos = np.divide(rows @ reference, norms * float(np.linalg.norm(reference)), out=np.zeros(len(rows)),
                    where=norms > 0)
    return {d: round(float(c), 4) for d, c, n in zip(ids, cos, norms) if n > 0}


def agree(devices: Mapping[str, DeviceInfo], cosines: Mapping[str, float]) -> dict[str, DeviceInfo]:
    """Fold one round's device cosines into each device's mean agreement with the majority (a new dict)."""
    out = dict(devices)
    for device_id, c in cosines.items():
        info = out.get(device_id) or DeviceInfo(device_id)
        n = info.verdicts + 1
        out[device_id] = replace(info, agreement=info.agreement + (c - info.agreement) / n, verdicts=n)
    return out


def weightless(devices: Mapping[str, DeviceInfo], recent: Sequence[Mapping[str, float]], min_cosine: float
               ) -> list[str]:
    """The devices that weigh nothing in the next round: those whose updates pointed against the majority on average
    over at least MIN_VERDICTS rounds, and those against it in each of the last MIN_VERDICTS rounds (`recent`: the
    round records' `distrusted_devices`). One round against is what an honest device with unusual data does now and
    then. A poisoner is against on average, and a sign flipper stays so after the model has moved away from its own
    data (its flipped update then agrees with the majority now and then, which breaks a streak but not the mean); a
    device captured after a long honest history is against round after round long before its mean turns."""
    on_average = {d for d, info in devices.items() if info.verdicts >= MIN_VERDICTS and info.agreement <= min_cosine}
    running = set.intersection(*(set(r) for r in recent)) if len(recent) >= MIN_VERDICTS else set()
    return sorted(on_average | running)


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
