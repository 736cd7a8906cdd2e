"""Example-level privacy accounting, Opacus-style: the state is the history of DP-SGD runs. The devices enforce
their budget with it and the cloud recomputes their guarantee with it (cloud.accounting), so both use this one code.

Each round of local DP-SGD adds one entry (noise_multiplier, sample_rate, steps); epsilon(delta) is derived from the
whole history, composing each entry as `steps` Poisson-subsampled Gaussian mechanisms -- exactly what the device
runs: device.training samples every step by independent Bernoulli(q) inclusions and divides by the expected batch
(docs/firmware_models.md "Poisson sampling"), so no fixed-size-batch approximation is involved. `can_afford` is
asked BEFORE training, with the round's planned steps, so a device never silently exceeds its budget; the caller
persists the new history before it publishes.

"rdp" is dp-accounting's RdpAccountant (same order grid, same formulas: log A_alpha of Mironov et al. 2019, the
series of its Sec. 3.3 for fractional orders, the Canonne-Kamath-Steinke conversion to (epsilon, delta)) ported to
the standard library + NumPy, equal to dp-accounting to 1e-9 (tests/test_device_core.py checks it): importing
dp-accounting pulls in SciPy, ~80 MB of resident memory that a wearable cannot spare. Per (q, noise) pair the RDP
curve is computed once and cached, so a device pays it once, not every round. "pld" (tighter) uses dp-accounting's
PLDAccountant and pays that memory, lazily.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

ACCOUNTANTS = ("rdp", "pld")
RDP_ORDERS = (*(1 + x / 10 for x in range(1, 100)), *range(11, 64), 128, 256, 512, 1024)  # dp-accounting's default
MAX_SERIES_TERMS = 1000  # as dp-accounting: a fractional order whose series has not converged is left out
INT_ORDERS = tuple(int(a) for a in RDP_ORDERS if float(a).is_integer())
INT_AT = [RDP_ORDERS.index(a) for a in INT_ORDERS]   # their places in RDP_ORDERS
CALIBRATION_RANGE = 100.0      # calibrate searches noise in [ceiling / 100, ceiling] ...
CALIBRATION_TOLERANCE = 1e-3   # ... to this relative precision


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


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def _log_comb(n: float, k: float) -> float:
    """log |C(n, k)| (for fractional n too, like scipy's gammaln)."""
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_erfc(x: float) -> float:
    r = math.erfc(x)
    if r > 0:
        return math.log(r)
    # the Laurent series of the tail at infinity (dp-accounting's fallback)
    return (-math.log(math.pi) / 2 - math.log(x) - x**2 - 0.5 * x**-2 + 0.625 * x**-4 - 37.0 / 24.0 * x**-6
            + 353.0 / 64.0 * x**-8)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    k = np.arange(alpha + 1, dtype=np.float64)
    log_comb = np.array([_log_comb(alpha, i) for i in range(alpha + 1)])
    terms = log_comb + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
    top = terms.max()
    return float(top + math.log(np.exp(terms - top).sum()))


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """The two-sided series of Mironov et al. 2019, Sec. 3.3; inf when it does not converge."""
    log_a0 = log_a1 = last_s0 = last_s1 = -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    for i in range(MAX_SERIES_TERMS):
        log_coef, j = _log_comb(alpha, i), alpha - i
        log_s0 = (log_coef + i * log_q + j * log_1mq + (i * i - i) / (2 * sigma**2) + math.log(0.5)
                  + _log_erfc((i - z0) / (math.sqrt(2) * sigma)))
        log_s1 = (log_coef + j * log_q + i * log_1mq + (j * j - j) / (2 * sigma**2) + math.log(0.5)
                  + _log_erfc((z0 - j) / (math.sqrt(2) * sigma)))
        log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        total = _log_add(log_a0, log_a1)
        if log_s0 < last_s0 and log_s1 < last_s1 and max(log_s0, log_s1) < total - 30:
            return total
        last_s0, last_s1 = log_s0, log_s1
    return math.inf


@lru_cache(maxsize=64)
def rdp_subsampled_gaussian(q: float, noise_mult: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at each of RDP_ORDERS; cached (the array is read-only)."""
    orders = np.array(RDP_ORDERS, np.float64)
    if q == 0:
        out = np.zeros_like(orders)
    elif noise_mult == 0:
        out = np.full_like(orders, np.inf)
    elif q == 1:
        out = orders / (2 * noise_mult**2)
    else:
        out = np.array([(_log_a_int(q, noise_mult, int(a)) if float(a).is_integer()
                         else _log_a_frac(q, noise_mult, a)) / (a - 1) for a in RDP_ORDERS])
    out.flags.writeable = False
    return out


def _rdp_int_step(q: float, noise_mult: float) -> np.ndarray:
    """RDP of one step at INT_ORDERS (calibrate's search; not cached: each candidate noise is new)."""
    if q >= 1:
        return np.array(INT_ORDERS, np.float64) / (2 * noise_mult**2)
    return np.array([_log_a_int(q, noise_mult, a) / (a - 1) for a in INT_ORDERS])


def _rdp_int(history: History) -> np.ndarray:
    """RDP at INT_ORDERS of everything in `history` (from the cached full-grid curves)."""
    total = np.zeros(len(INT_ORDERS))
    for e in history:
        if e.steps > 0 and e.sample_rate > 0:
            total = total + e.steps * rdp_subsampled_gaussian(e.sample_rate, e.noise_mult)[INT_AT]
    return total


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: Sequence[float] = RDP_ORDERS) -> float:
    """The smallest epsilon over the orders (the conversion of dp-accounting's compute_epsilon)."""
    best = math.inf
    for alpha, r in zip(orders, rdp):
        if r < 0 or delta**2 + math.expm1(-r) > 0:
            return 0.0
        if alpha > 1.01:
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


def epsilon(history: Sequence[Entry], delta: float, accountant: str = "rdp") -> float:
    """The (epsilon, delta)-DP guarantee of everything in `history`; inf if any entry had no noise."""
    return _epsilon(tuple(history), float(delta), accountant)


@lru_cache(maxsize=64)
def _epsilon(history: History, delta: float, accountant: str) -> float:
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


def can_afford(history: Sequence[Entry], entry: Entry, budget_epsilon: float, delta: float,
               accountant: str = "rdp") -> bool:
    """Would running `entry` keep the total within `budget_epsilon` at `delta`?"""
    return epsilon((*history, entry), delta, accountant) <= budget_epsilon


def calibrate(history: Sequence[Entry], sample_rate: float, steps: int, rounds: int, target_epsilon: float,
              delta: float, ceiling: float) -> float:
    """The least noise multiplier, at most `ceiling`, with which `history` plus `rounds` more rounds of `steps`
    steps at `sample_rate` stays within `target_epsilon` at `delta`: Opacus's make_private_with_epsilon, per device
    and per round, so a device with more data than the smallest (a lower q) adds less noise for the same guarantee.
    `ceiling` when even that does not fit (the budget check then decides). Pure and deterministic, so the cloud
    re-derives the smallest device's choice exactly. Searched on the integer RDP orders only (25x faster than
    the full grid, and conservative: fewer orders can only give a larger epsilon), to 0.1 % of the noise, then
    rounded up to 4 significant digits, so that round after round the same value recurs and its cached RDP curve
    serves the accountant."""
    spent = _rdp_int(tuple(history))
    k = max(int(steps), 0) * max(int(rounds), 1)

    def fits(noise: float) -> bool:
        return rdp_to_epsilon(spent + k * _rdp_int_step(sample_rate, noise), delta, INT_ORDERS) <= target_epsilon

    if k == 0 or sample_rate <= 0 or ceiling <= 0 or not fits(ceiling):
        return float(ceiling)
    lo, hi = ceiling / CALIBRATION_RANGE, float(ceiling)
    if fits(lo):
        return lo
    while hi / lo > 1 + CALIBRATION_TOLERANCE:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    unit = 10.0 ** (math.floor(math.log10(hi)) - 3)
    tidy = min(float(ceiling), float(f"{math.ceil(hi / unit) * unit:.4g}"))
    return tidy if fits(tidy) else hi

