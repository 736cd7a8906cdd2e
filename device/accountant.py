"""Example-level privacy accounting on the device, Opacus-style: the state is the history of DP-SGD runs.

Each round of local DP-SGD adds one entry (noise_multiplier, sample_rate, steps); epsilon(delta) is derived from the
whole history with `dp-accounting` (RDP or PLD), composing each entry as `steps` Poisson-subsampled Gaussian
mechanisms. Like Opacus and TF Privacy, uniformly drawn fixed-size batches are accounted with q = batch / n as
Poisson sampling (the standard approximation). `can_afford` is asked BEFORE training, with the round's planned
steps, so a device never silently exceeds its budget; the caller persists the new history before it publishes.
`dp_accounting` (and its SciPy) is imported lazily: only the device's training path pays for it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

ACCOUNTANTS = ("rdp", "pld")
# Integer orders: the subsampled-Gaussian RDP is exact and fast there (fractional orders cost ~20x on a large
# sample rate); the epsilon is within ~2% of dp-accounting's default order grid and always a valid upper bound.
RDP_ORDERS = (*range(2, 65), 128, 256, 512)


@dataclass(frozen=True)
class Entry:
    """One round of DP-SGD on this device's data."""

    noise_mult: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_mult >= 0 and 0 <= self.sample_rate <= 1 and self.steps >= 0):
            raise ValueError(f"invalid accountant entry {self}")

    def to_list(self) -> list:
        return [float(self.noise_mult), float(self.sample_rate), int(self.steps)]

    @classmethod
    def from_list(cls, item: list) -> Entry:
        noise_mult, sample_rate, steps = item
        return cls(float(noise_mult), float(sample_rate), int(steps))


History = tuple[Entry, ...]


def _quiet_absl() -> None:
    """dp-accounting logs a warning per RDP order it drops for numerical reasons; the result is still an upper bound."""
    logging.getLogger("absl").setLevel(logging.ERROR)


def _event(history: History):
    from dp_accounting import dp_event

    events = [dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(e.sample_rate,
                                                                         dp_event.GaussianDpEvent(e.noise_mult)),
                                           e.steps)
              for e in history if e.steps > 0 and e.sample_rate > 0]
    return dp_event.ComposedDpEvent(events)


@lru_cache(maxsize=64)
def epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """The (epsilon, delta)-DP guarantee of everything in `history`; inf if any entry had no noise (cached)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant {accountant!r} not in {ACCOUNTANTS}")
    active = tuple(e for e in history if e.steps > 0 and e.sample_rate > 0)
    if not active:
        return 0.0
    if any(e.noise_mult <= 0 for e in active):
        return math.inf
    _quiet_absl()
    if accountant == "rdp":
        from dp_accounting.rdp import rdp_privacy_accountant

        acc = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS))
    else:
        from dp_accounting.pld import pld_privacy_accountant

        acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(_event(active))
    return float(acc.get_epsilon(delta))


def can_afford(history: History, entry: Entry, budget_epsilon: float, delta: float, accountant: str = "rdp") -> bool:
    """Would running `entry` keep the total within `budget_epsilon` at `delta`?"""
    return epsilon((*history, entry), delta, accountant) <= budget_epsilon

