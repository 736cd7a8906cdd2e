"""Collusion check: flag updates that point almost exactly the same way as another update of the round.

Honest devices hold different data, so their deltas are at most loosely aligned (watch, non-IID: pairwise cosines
<= 0.7 even in the first round); colluding devices that push one poisoned direction (sybils, a targeted attack
from several devices) send near-parallel deltas, and when they are a majority of a small edge they also capture the
median that the cosine filter compares with (FoolsGold, Fung et al. 2020, makes the same observation). An update is
flagged when its highest cosine to another update reaches both `max_cos` and the round's typical alignment plus
`margin`, the typical alignment being the median |cosine| over all pairs: where updates line up along one axis,
either way (IID devices, the first steps from a fresh model, or sign-flipped copies of such updates, which would
pull a signed median down and make honest IID devices look like colluders), near-parallel pairs are expected and
nothing is flagged. Attackers that blur their copies with their own noise each round (cosine ~0.5 between two of
them, as close as honest devices come) evade this check: that attack is measured in EXPERIMENTS.md "The edges'
collusion check".
"""

from __future__ import annotations

import numpy as np

from edge.filters.base import Verdict, row_norms


def unit_rows(X: np.ndarray) -> np.ndarray:
    """The rows scaled to unit L2 norm (a zero row stays zero), in float32: a cosine needs no more than float32's
    ~1e-7 to be compared with thresholds given to two decimals, and a float64 copy of the matrix cost 4-6x the time
    (1,000 x 50,050: 0.4 s against 1.9-3.0 s)."""
    norms = row_norms(X).astype(np.float32)
    out = np.zeros(X.shape, np.float32)
    return np.divide(X.astype(np.float32, copy=False), norms[:, None], out=out, where=norms[:, None] > 0)


def pairwise_cosines(X: np.ndarray) -> np.ndarray:
    """(n, n) cosine similarities of the rows (0 for a zero row), diagonal excluded as -inf."""
    units = unit_rows(X)
    cos = units @ units.T
    np.fill_diagonal(cos, -np.inf)
    return cos


def near_duplicates(X: np.ndarray, max_cos: float = 0.85, margin: float = 0.3, min_share: float = 0.25,
                    max_peers: int = 1000) -> Verdict:
    """Only a group of near-parallel updates holding `min_share` of the round is flagged (at an edge of 5: any two;
    of 100: 25): such a group can move the cosine filter's median, while at a large edge two honest devices cut from
    the same records can send near-identical updates (the 1,000-device simulation: 2-5 windows per device).
    Above `max_peers` updates each is compared with a random sample of `max_peers` of them (n x max_peers cosines
    instead of n x n: 10,000 updates cost what 1,000 would ten times) and its group's size is estimated from the
    sample; the sample is drawn afresh each round, so no arrival order avoids it."""
    n = X.shape[0]
    if n < 2:
        return Verdict(scores=np.zeros(n), flags=np.zeros(n, dtype=bool))
    if n <= max_peers:
        cos = pairwise_cosines(X)
        pairs = cos[np.triu_indices(n, k=1)]
    else:
        units = unit_rows(X)
        peers = np.random.default_rng().choice(n, size=max_peers, replace=False)
        cos = units @ units[peers].T
        cos[peers, np.arange(max_peers)] = -np.inf   # an update is not its own peer
        pairs = cos[np.isfinite(cos)]
    close = cos >= max(max_cos, float(np.median(np.abs(pairs))) + margin)
    group = 1 + close.sum(axis=1) * (n - 1) / cos.shape[1] if n > max_peers else 1 + close.sum(axis=1)
    return Verdict(scores=cos.max(axis=1).astype(np.float64), flags=(group >= 2) & (group >= min_share * n))
