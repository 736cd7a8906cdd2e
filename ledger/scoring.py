"""Contribution scoring: pure numpy functions over one round's updates.

A round's participants (devices of an edge, or the edges of the federation) are players of a cooperative game whose
value of a coalition S is the validation utility of the model obtained by aggregating only S's updates onto the
previous global model ("within-round gradient reconstruction", GTG-Shapley, Liu et al. 2022): no retraining is
needed, so leave-one-out and Shapley values cost only utility evaluations. Exact Shapley needs 2^n of them; the
truncated, guided Monte-Carlo estimate needs far fewer and is unbiased when truncation is off.

Robustness: participants flagged by the edge's anomaly filters were not aggregated, so they are not players and earn
nothing; free riders (all-zero or pure-noise updates) fail the quality gate (cosine similarity to the other
participants' mean update) and earn nothing whatever their marginal value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Utility = Callable[[np.ndarray], float]
CoalitionValue = Callable[[frozenset[int]], float]


@dataclass(frozen=True)
class RewardPolicy:
    """How a round's tokens are shared (the `[ledger]` table of the cloud config; defaults below).

    tokens_per_round: integer tokens minted per round, split in proportion to the scores of eligible participants
      (none minted when nobody is eligible).
    min_score: a participant whose score is below this earns nothing (scores are clipped marginal values).
    min_quality: the free-rider gate: cosine similarity of a participant's update to the mean of the others'.
      Pure noise in d dimensions scores ~1/sqrt(d); an honest update on related data scores well above.
    """

    tokens_per_round: int = 1000
    min_score: float = 1e-9
    min_quality: float = 0.05

    def __post_init__(self) -> None:
        for name in ("min_score", "min_quality"):  # an int from code must still encode as a CBOR float
            object.__setattr__(self, name, float(getattr(self, name)))
        if type(self.tokens_per_round) is not int or self.tokens_per_round < 0:
            raise ValueError("tokens_per_round must be a non-negative integer")
        if not (math.isfinite(self.min_score) and self.min_score > 0):
            raise ValueError("min_score must be positive and finite")
        if not (math.isfinite(self.min_quality) and -1.0 <= self.min_quality <= 1.0):
            raise ValueError("min_quality must be within [-1, 1]")

    @classmethod
    def from_mapping(cls, table: dict) -> RewardPolicy:
        """From a TOML table; unknown keys are an error (a typo must not silently change the money)."""
        unknown = set(table) - {"tokens_per_round", "min_score", "min_quality"}
        if unknown:
            raise ValueError(f"unknown reward policy keys: {sorted(unknown)}")
        return cls(**{k: (int(v) if k == "tokens_per_round" else float(v)) for k, v in table.items()})

    def to_mapping(self) -> dict:
        return {"tokens_per_round": self.tokens_per_round, "min_score": self.min_score,
                "min_quality": self.min_quality}


@dataclass(frozen=True)
class Contribution:
    """One participant's measured contribution to one round (what a ledger record stores before its reward)."""

    participant: str
    samples: int
    on_time: bool
    flagged: bool
    quality: float
    loo: float
    shapley: float


def aggregate(updates: Sequence[np.ndarray], samples: Sequence[int], members: frozenset[int] | Sequence[int]
              ) -> np.ndarray:
    """Sample-weighted mean (FedAvg) of the members' updates; zeros for the empty coalition."""
    idx = sorted(members)
    if not idx:
        return np.zeros_like(updates[0], dtype=np.float64)
    w = np.asarray([samples[i] for i in idx], dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    return np.tensordot(w / w.sum(), np.stack([updates[i] for i in idx]).astype(np.float64), axes=1)


def coalition_value(base: np.ndarray, updates: Sequence[np.ndarray], samples: Sequence[int], utility: Utility
                    ) -> CoalitionValue:
    """v(S) = utility(base + aggregate(S)), memoised (the Shapley estimators revisit coalitions)."""
    cache: dict[frozenset[int], float] = {}
    base64 = np.asarray(base, dtype=np.float64)

    def value(members: frozenset[int]) -> float:
        if members not in cache:
            cache[members] = float(utility(base64 + aggregate(updates, samples, members)))
        return cache[members]

    value.cache = cache  # type: ignore[attr-defined]  # evaluation count, for benchmarks
    return value


def leave_one_out(n: int, value: CoalitionValue) -> np.ndarray:
    """v(N) - v(N \\ {i}): cheap (n+1 evaluations) but blind to redundancy between similar participants."""
    full = frozenset(range(n))
    return np.asarray([value(full) - value(full - {i}) for i in range(n)])


def exact_shapley(n: int, value: CoalitionValue) -> np.ndarray:
    """Exact Shapley values over all 2^n coalitions (practical up to n ~ 12)."""
    if n > 16:
        raise ValueError(f"exact Shapley over {n} players needs 2^{n} utility evaluations; use gtg_shapley")
    phi = np.zeros(n)
    weights = [math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)]
    for mask in range(1 << n):
        members = frozenset(i for i in range(n) if mask >> i & 1)
        v = value(members)
        for i in range(n):
            if i not in members:
                phi[i] += weights[len(members)] * (value(members | {i}) - v)
    return phi


def gtg_shapley(n: int, value: CoalitionValue, rng: np.random.Generator, *, max_permutations: int = 200,
                truncation: float = 0.0, tolerance: float = 0.01, min_permutations: int | None = None
                ) -> np.ndarray:
    """Guided, truncated Monte-Carlo Shapley (GTG-Shapley).

    Between-round truncation: if the whole round moved the utility by at most `truncation`, all values are zero.
    Within a permutation, once the prefix's utility is within `truncation` of v(N), the remaining marginals are zero.
    Guided sampling: permutation k starts with player k mod n, so every player is seen first equally often. Stops
    after `max_permutations`, or once the estimate's mean relative change over the last n permutations is below
    `tolerance` (after at least `min_permutations`, default 2n).
    """
    if n == 0:
        return np.zeros(0)
    full = frozenset(range(n))
    v_empty, v_full = value(frozenset()), value(full)
    if truncation > 0 and abs(v_full - v_empty) <= truncation:
        return np.zeros(n)
    min_permutations = 2 * n if min_permutations is None else min_permutations
    total = np.zeros(n)
    history: list[np.ndarray] = []
    for k in range(max_permutations):
        first = k % n
        rest = [int(i) for i in rng.permutation(n) if i != first]
        prefix: frozenset[int] = frozenset()
        v_prev = v_empty
        for i in [first, *rest]:
            if truncation > 0 and abs(v_full - v_prev) <= truncation:
                break
            prefix = prefix | {i}
            v_now = value(prefix)
            total[i] += v_now - v_prev
            v_prev = v_now
        history.append(total / (k + 1))
        if k + 1 >= max(min_permutations, n + 1):
            old, new = history[-1 - n], history[-1]
            change = np.abs(new - old).sum() / max(np.abs(new).sum(), 1e-12)
            if change < tolerance:
                break
    return total / len(history)


def quality(updates: Sequence[np.ndarray]) -> np.ndarray:
    """Cosine similarity of each update to the mean of the others (0 for an all-zero update or a lone player)."""
    n = len(updates)
    if n < 2:
        return np.ones(n)
    stack = np.stack([np.asarray(u, dtype=np.float64) for u in updates])
    total = stack.sum(axis=0)
    out = np.zeros(n)
    for i in range(n):
        others = (total - stack[i]) / (n - 1)
        denom = np.linalg.norm(stack[i]) * np.linalg.norm(others)
        out[i] = float(stack[i] @ others / denom) if denom > 0 else 0.0
    return np.clip(out, -1.0, 1.0)  # rounding can step just past +-1


def score(c: Contribution, policy: RewardPolicy) -> float:
    """The score rewards are split by: the clipped Shapley value, zero for late, flagged or free-riding players."""
    if c.flagged or not c.on_time or c.quality < policy.min_quality:
        return 0.0
    return max(float(c.shapley), 0.0)


def allocate(policy: RewardPolicy, scores: Sequence[float]) -> list[int]:
    """Integer rewards proportional to the scores at or above min_score, summing exactly to tokens_per_round.

    Largest-remainder rounding with ties broken by position, so every validator computes the same split.
    """
    eligible = [s if s >= policy.min_score else 0.0 for s in scores]
    total = math.fsum(eligible)
    if total <= 0:
        return [0] * len(scores)
    exact = [policy.tokens_per_round * s / total for s in eligible]
    rewards = [math.floor(x) for x in exact]
    left = policy.tokens_per_round - sum(rewards)
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - rewards[i]), i))
    for i in order[:left]:
        rewards[i] += 1
    return rewards


def score_round(participants: Sequence[str], updates: Sequence[np.ndarray], samples: Sequence[int],
                on_time: Sequence[bool], flagged: Sequence[bool], base: np.ndarray, utility: Utility,
                rng: np.random.Generator, exact_up_to: int = 8, **gtg) -> list[Contribution]:
    """Everything the cloud (or an edge) records for one round: quality, leave-one-out and Shapley per participant.

    Flagged participants are not players (the filters kept them out of the aggregate). Shapley is exact for at most
    `exact_up_to` players and GTG-Shapley (keyword arguments `gtg`) above.
    """
    n = len(participants)
    if not (len(updates) == len(samples) == len(on_time) == len(flagged) == n):
        raise ValueError("participants, updates, samples, on_time and flagged must have the same length")
    players = [i for i in range(n) if not flagged[i]]
    q = np.zeros(n)
    loo = np.zeros(n)
    phi = np.zeros(n)
    if players:
        sub_updates = [updates[i] for i in players]
        value = coalition_value(base, sub_updates, [samples[i] for i in players], utility)
        m = len(players)
        q[players] = quality(sub_updates)
        loo[players] = leave_one_out(m, value)
        phi[players] = exact_shapley(m, value) if m <= exact_up_to else gtg_shapley(m, value, rng, **gtg)
    return [Contribution(participants[i], int(samples[i]), bool(on_time[i]), bool(flagged[i]), float(q[i]),
                         float(loo[i]), float(phi[i])) for i in range(n)]
