"""The heterogeneity model: per-device compute speed, link bandwidth and dropout, and what they imply on a virtual
clock (local steps done before the deadline, upload time, arrival time). Pure functions of (config, rng).

Compute speed (local steps per second) is Gamma-distributed with the configured mean and coefficient of variation
(CV = std / mean; CV 0 = identical devices, CV 1 = exponential, a few fast devices and many slow ones). Bandwidth is
log-normal around its median. The virtual round deadline is set once per run from the plan: `slack` times what
a mean-speed device needs for the planned work that covers `deadline_quantile` (0.9) of the rows (`deadline_steps`:
a quantile of the devices' planned steps weighted by their data, so the largest sites are not cut every round on
quantity-skewed data, as the median device's work did) plus, at the median bandwidth, a dense float32 model down and a
dense update up; it is the same for every method (an operator's setting), so compressing methods leave their devices
more time to compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from device.training import steps_within

CLASSES = ("wearable", "phone", "pi")   # compute classes (protocol.messages.Capability), slowest first


@dataclass(frozen=True)
class HeteroConfig:
    """How heterogeneous the simulated fleet is: spread of compute speed and bandwidth, dropout, deadline slack."""

    cv: float = 0.0                      # coefficient of variation of compute speed
    mean_steps_per_s: float = 10.0       # mean device speed (virtual)
    bandwidth_bps: float = 250_000.0     # median uplink/downlink (BLE/Wi-Fi wearables ~ 0.1-1 Mbit/s)
    bandwidth_sigma: float = 0.5         # log-normal sigma of bandwidth
    dropout: float = 0.0                 # probability a device is offline for a round
    slack: float = 1.5                   # deadline = slack * planned steps / mean speed + transfers
    deadline_quantile: float = 0.9       # the planned steps the deadline covers: this quantile of the plan's work ...
    deadline_weighted: bool = True       # ... weighted by rows (True) or per device (False; 0.5 = the median device)

    def __post_init__(self) -> None:
        if self.cv < 0 or self.mean_steps_per_s <= 0 or self.bandwidth_bps <= 0 or not 0 <= self.dropout < 1 \
                or not 0 < self.deadline_quantile <= 1:
            raise ValueError(f"invalid heterogeneity config {self}")


@dataclass(frozen=True)
class Profile:
    """One simulated device's draw: its speed, its bandwidth and the compute class its speed tercile implies."""

    steps_per_s: float
    bandwidth_bps: float
    compute_class: str


def gamma_speeds(n: int, mean: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """n speeds with the given mean and coefficient of variation (constant when cv = 0)."""
    if cv <= 0:
        return np.full(n, float(mean))
    shape = 1.0 / cv**2
    return np.maximum(rng.gamma(shape, mean / shape, size=n), 1e-3 * mean)


def draw_profiles(n: int, cfg: HeteroConfig, rng: np.random.Generator) -> list[Profile]:
    speeds = gamma_speeds(n, cfg.mean_steps_per_s, cfg.cv, rng)
    bandwidth = cfg.bandwidth_bps * np.exp(cfg.bandwidth_sigma * rng.standard_normal(n))
    ranks = np.argsort(np.argsort(speeds)) * len(CLASSES) // max(n, 1)   # speed terciles -> compute class
    return [Profile(float(s), float(b), CLASSES[min(int(r), len(CLASSES) - 1)])
            for s, b, r in zip(speeds, bandwidth, ranks)]


def transfer_s(nbytes: int, bandwidth_bps: float) -> float:
    return 8.0 * nbytes / bandwidth_bps


def deadline_steps(planned: list[int], rows: list[int], quantile: float = 0.9, weighted: bool = True) -> int:
    """The planned work the deadline is sized for: the `quantile` of the devices' planned steps, each device counted
    by its rows (weighted: the work under which that share of the DATA is planned) or once (unweighted; 0.5 is the
    median device, which on quantity-skewed data leaves the largest sites out of every fixed-work round)."""
    order = np.argsort(planned, kind="stable")
    steps = np.asarray(planned, np.float64)[order]
    weight = np.asarray(rows, np.float64)[order] if weighted else np.ones(len(steps))
    cum = np.cumsum(weight) / weight.sum()
    return int(steps[min(int(np.searchsorted(cum, quantile - 1e-12)), len(steps) - 1)])


def deadline_s(planned_steps: int, download_bytes: int, upload_bytes: int, cfg: HeteroConfig) -> float:
    """The round's virtual length: `slack` times what the mean-speed, median-bandwidth device needs."""
    return cfg.slack * (planned_steps / cfg.mean_steps_per_s + transfer_s(download_bytes + upload_bytes,
                                                                          cfg.bandwidth_bps))


def local_steps(planned: int, profile: Profile, time_left_s: float, partial_work: bool) -> int:
    """Steps a device runs: all planned ones (classic FedAvg: it may then miss the deadline), or, with partial
    work, as many as fit in the time it has left (device.training.steps_within, what the device agent does)."""
    if not partial_work:
        return planned
    return steps_within(planned, max(time_left_s, 0.0), profile.steps_per_s)


def arrival_s(download_bytes: int, steps: int, upload_bytes: int, profile: Profile) -> float:
    """Virtual time at which a device's update reaches its edge, from the round's start."""
    return (transfer_s(download_bytes, profile.bandwidth_bps) + steps / profile.steps_per_s
            + transfer_s(upload_bytes, profile.bandwidth_bps))


def offline(n: int, dropout: float, rng: np.random.Generator) -> np.ndarray:
    """Which devices are offline this round (independent, probability `dropout`)."""
    return rng.random(n) < dropout if dropout > 0 else np.zeros(n, bool)


def coefficient_of_variation(values: np.ndarray) -> float:
    values = np.asarray(values, np.float64)
    mean = values.mean()
    return float(values.std() / mean) if mean > 0 else math.nan
