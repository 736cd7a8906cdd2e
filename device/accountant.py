"""Example-level privacy accounting on the device, Opacus-style: the state is the history of DP-SGD runs.

Each round of local DP-SGD adds one entry (noise_multiplier, sample_rate, steps); epsilon(delta) is derived from the
whole history, composing each entry as `steps` Poisson-subsampled Gaussian mechanisms. Like Opacus and TF Privacy,
uniformly drawn fixed-size batches are accounted with q = batch / n as Poisson sampling (the standard
approximation). `can_afford` is asked BEFORE training, with the round's planned steps, so a device never silently
exceeds its budget; the caller persists the new history before it publishes.

"rdp" is dp-accounting's RdpAccountant restricted to integer orders, computed here in NumPy: the same formulas
(log A_alpha of Mironov et al. 2019 and the Canonne-Kamath-Steinke conversion to (epsilon, delta)), equal to
dp-accounting to 1e-9 (tests/test_device_core.py checks it) -- because importing dp-accounting pulls in SciPy,
~80 MB of resident memory that a wearable cannot spare. "pld" (tighter) uses dp-accounting's PLDAccountant and
pays that memory, lazily.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

ACCOUNTANTS = ("rdp", "pld")
# Integer orders: the subsampled-Gaussian RDP has a closed form there (fractional orders need series that cost ~20x
# at large sample rates); the epsilon is within ~2% of dp-accounting's default grid and always a valid upper bound.
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


def _log_comb(n: int) -> np.ndarray:
    """log C(n, k) for k = 0..n."""
    return np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in range(n + 1)])


_LOG_COMB = {alpha: _log_comb(alpha) for alpha in RDP_ORDERS}


@lru_cache(maxsize=256)
def rdp_subsampled_gaussian(q: float, noise_mult: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at each of RDP_ORDERS (log A_alpha / (alpha - 1)); cached, so
    the returned array is read-only."""
    orders = np.array(RDP_ORDERS, np.float64)
    if q == 0 or noise_mult == 0 or q == 1:
        out = np.zeros_like(orders) if q == 0 else np.full_like(orders, np.inf) if noise_mult == 0 else \
            orders / (2 * noise_mult**2)
        out.flags.writeable = False
        return out
    out = np.empty_like(orders)
    for j, alpha in enumerate(RDP_ORDERS):
        k = np.arange(alpha + 1, dtype=np.float64)
        terms = _LOG_COMB[alpha] + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * noise_mult**2)
        top = terms.max()
        out[j] = (top + math.log(np.exp(terms - top).sum())) / (alpha - 1)
    out.flags.writeable = False
    return out


def rdp_to_epsilon(rdp: np.ndarray, delta: float) -> float:
    """The smallest epsilon over the orders (the conversion of dp-accounting's compute_epsilon)."""
    best = math.inf
    for alpha, r in zip(RDP_ORDERS, rdp):
        if r < 0 or delta**2 + math.expm1(-r) > 0:
            return 0.0
        best = min(best, r + math.log1p(-1 / alpha) - math.log(delta * alpha) / (alpha - 1))
    return max(0.0, best)


def _pld_epsilon(history: History, delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    _quiet_absl()
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(e.sample_rate, dp_event.GaussianDpEvent(
            e.noise_mult)), e.steps) for e in history]))
    return float(acc.get_epsilon(delta))


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
    if accountant == "pld":
        return _pld_epsilon(active, delta)
    return rdp_to_epsilon(sum(e.steps * rdp_subsampled_gaussian(e.sample_rate, e.noise_mult) for e in active), delta)


def can_afford(history: History, entry: Entry, budget_epsilon: float, delta: float, accountant: str = "rdp") -> bool:
    """Would running `entry` keep the total within `budget_epsilon` at `delta`?"""
    return epsilon((*history, entry), delta, accountant) <= budget_epsilon

