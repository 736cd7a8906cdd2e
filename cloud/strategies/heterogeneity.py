"""Heterogeneity-aware control (pure functions used by the FedIoMT strategy, each switchable for ablations).

- Device selection by importance sampling: inclusion probability from each device's recent update norm (the
  variance-optimal choice for estimating a mean of updates), mixed with uniform so nobody starves; systematic
  pi-ps sampling draws exactly m devices with exactly those inclusion probabilities pi_i, and the Horvitz-Thompson
  weight 1 / (N pi_i) makes sum_{i in S} w_i u_i an unbiased estimate of the population mean of the updates.
- Per-device learning rates: a factor per compute class times the device's data quality (the running fraction of
  its updates the edges' filters did not flag).
- Local steps adapted to the deadline, and FedNova-style normalisation of the edges' mean deltas by their mean
  local steps, so that devices (edges) that ran more steps do not pull the objective toward their data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from cloud.strategies.base import DeviceInfo, EdgeResult, weighted_mean


def inclusion_probabilities(scores: np.ndarray, m: int, uniform_mix: float = 0.2) -> np.ndarray:
    """pi_i proportional to (1 - a) s_i / sum(s) + a / N, capped at 1, summing to min(m, N)."""
    scores = np.asarray(scores, np.float64)
    n = scores.size
    m = min(int(m), n)
    if n == 0 or m <= 0:
        return np.zeros(n)
    total = scores.sum()
    p = np.full(n, 1.0 / n) if total <= 0 else (1 - uniform_mix) * scores / total + uniform_mix / n
    pi = np.zeros(n)
    capped = np.zeros(n, bool)
    for _ in range(n):  # give capped units probability 1 and share what is left among the others
        left = m - capped.sum()
        free = ~capped
        pi[free] = left * p[free] / p[free].sum()
        pi[capped] = 1.0
        over = free & (pi >= 1.0)
        if not over.any():
            break
        capped |= over
    return np.clip(pi, 0.0, 1.0)


def systematic_sample(pi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a sample of exactly round(sum(pi)) units in which unit i appears with probability pi_i."""
    order = rng.permutation(pi.size)
    cum = np.concatenate([[0.0], np.cumsum(pi[order])])
    points = rng.random() + np.arange(int(round(cum[-1])))
    picked = np.searchsorted(cum, points, side="right") - 1
    return np.sort(order[np.clip(picked, 0, pi.size - 1)])


def importance_sample(devices: Mapping[str, DeviceInfo], m: int, rng: np.random.Generator,
                      uniform_mix: float = 0.2) -> tuple[list[str], dict[str, float]]:
    """(cohort, sample_weight = 1 / (N pi_i)). Devices never seen yet score as the mean of those seen."""
    ids = sorted(devices)
    norms = np.array([devices[i].norm for i in ids], np.float64)
    seen = norms > 0
    norms[~seen] = norms[seen].mean() if seen.any() else 1.0
    pi = inclusion_probabilities(norms, m, uniform_mix)
    chosen = systematic_sample(pi, rng)
    return [ids[i] for i in chosen], {ids[i]: float(1.0 / (len(ids) * pi[i])) for i in chosen}


def lr_scales(devices: Iterable[DeviceInfo], class_lr: Mapping[str, float], min_quality: float = 0.2
              ) -> dict[str, float]:
    """lr_scale_i = class factor (1 for unknown classes) * max(min_quality, quality_i)."""
    return {d.device_id: float(class_lr.get(d.compute_class, 1.0) * max(min_quality, d.quality)) for d in devices}


def deadline_steps(steps_per_s: Iterable[float], round_seconds: float, fraction: float = 0.5) -> int:
    """Local steps the median device fits in `fraction` of the round (0 = no device reported its speed)."""
    speeds = [s for s in steps_per_s if s > 0]
    if not speeds:
        return 0
    return max(1, int(float(np.median(speeds)) * round_seconds * fraction))


def fednova_combine(results: list[EdgeResult], weights: list[float], n_params: int) -> np.ndarray:
    """tau_eff * sum_e p_e d_e / tau_e with tau_eff = sum_e p_e tau_e (Wang et al. 2020, at the edge level)."""
    taus = [r.mean_local_steps for r in results]
    if any(t <= 0 for t in taus):  # an edge without a step count: normalisation is undefined, plain mean
        return weighted_mean(results, weights, n_params)
    total = float(sum(weights))
    if total <= 0:
        return np.zeros(n_params, np.float32)
    tau_eff = sum(w * t for w, t in zip(weights, taus)) / total
    normalised = [dataclasses.replace(r, delta=None if r.delta is None else r.delta / np.float32(t))
                  for r, t in zip(results, taus)]
    return (tau_eff * weighted_mean(normalised, weights, n_params)).astype(np.float32)


def observe(devices: dict[str, DeviceInfo], device_ids: Iterable[str], filtered: Iterable[str],
            update_norms: Mapping[str, float], decay: float = 0.5) -> dict[str, DeviceInfo]:
    """Fold one edge aggregate's per-device facts into the running norms and qualities (returns a new dict)."""
    out = dict(devices)
    flagged = set(filtered)
    for device_id in {*device_ids, *flagged}:
        info = out.get(device_id) or DeviceInfo(device_id)
        norm = info.norm
        if device_id in update_norms:
            new = float(update_norms[device_id])
            norm = new if info.norm <= 0 else decay * info.norm + (1 - decay) * new
        quality = decay * info.quality + (1 - decay) * (0.0 if device_id in flagged else 1.0)
        out[device_id] = dataclasses.replace(info, norm=norm, quality=quality, rounds=info.rounds + 1)
    return out
