"""Contribution scoring: Shapley estimators against exact values, free riders and flagged players earn nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ledger.scoring import (
    Contribution,
    RewardPolicy,
    aggregate,
    allocate,
    coalition_value,
    exact_shapley,
    gtg_shapley,
    leave_one_out,
    quality,
    score,
    score_round,
)

D = 4096  # a small model's parameter count: pure noise has cosine ~ 1/sqrt(D) = 0.016 to anything


def toy_round(n_honest: int = 5, seed: int = 0, d: int = D):
    """Linear regression: honest deltas point at the true weights with decreasing accuracy; a zero update and a
    pure-noise update of the same norm are the free riders. Utility = -validation MSE."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d)
    x = rng.normal(size=(256, d)) / math.sqrt(d)
    y = x @ w_true
    base = np.zeros(d)
    honest = [w_true + rng.normal(scale=0.4 * (i + 1), size=d) for i in range(n_honest)]
    noise = rng.normal(size=d) * np.linalg.norm(w_true) / math.sqrt(d)
    updates = honest + [np.zeros(d), noise]

    def utility(w: np.ndarray) -> float:
        return -float(np.mean((x @ w - y) ** 2))

    return base, updates, utility


def additive_game(values: list[float]):
    return lambda members: float(sum(values[i] for i in members))


def test_exact_shapley_of_an_additive_game_is_each_players_value():
    values = [3.0, -1.0, 0.5, 0.0]
    assert np.allclose(exact_shapley(4, additive_game(values)), values)
    assert np.allclose(leave_one_out(4, additive_game(values)), values)


def test_exact_shapley_of_a_glove_game():
    # v(S) = 1 when S holds the left glove (0) and a right glove (1 or 2): Shapley values are 2/3, 1/6, 1/6.
    def glove(members):
        return float(0 in members and bool({1, 2} & members))

    assert np.allclose(exact_shapley(3, glove), [2 / 3, 1 / 6, 1 / 6])
    assert np.allclose(leave_one_out(3, glove), [1.0, 0.0, 0.0])  # LOO misses the redundant right gloves


def test_gtg_shapley_approximates_exact_and_is_efficient():
    base, updates, utility = toy_round()
    n = len(updates)
    samples = [100] * n
    exact = exact_shapley(n, coalition_value(base, updates, samples, utility))
    value = coalition_value(base, updates, samples, utility)
    approx = gtg_shapley(n, value, np.random.default_rng(1), max_permutations=1000, tolerance=0.0)
    assert np.abs(approx - exact).sum() / np.abs(exact).sum() < 0.1
    # every sampled permutation's marginals telescope to v(N) - v(empty), so efficiency holds exactly
    assert approx.sum() == pytest.approx(exact.sum(), rel=1e-9)
    assert np.argmax(approx) == np.argmax(exact) == 0


def test_gtg_truncation_and_convergence_save_evaluations():
    base, updates, utility = toy_round(n_honest=10, d=256)
    n = len(updates)
    value = coalition_value(base, updates, [100] * n, utility)
    gtg_shapley(n, value, np.random.default_rng(2), truncation=1e-3)
    assert len(value.cache) < 2**n / 2
    # a round that moved nothing: between-round truncation gives zeros without sampling permutations
    still = coalition_value(base, [np.zeros(256)] * 3, [1, 1, 1], utility)
    assert np.array_equal(gtg_shapley(3, still, np.random.default_rng(0), truncation=1e-6), np.zeros(3))
    assert len(still.cache) == 2


def test_aggregate_is_sample_weighted():
    ups = [np.ones(3), 3 * np.ones(3)]
    assert np.allclose(aggregate(ups, [1, 3], {0, 1}), 2.5 * np.ones(3))
    assert np.array_equal(aggregate(ups, [1, 3], set()), np.zeros(3))


def test_quality_flags_zero_and_noise_updates():
    _, updates, _ = toy_round()
    q = quality(updates)
    assert q[-2] == 0.0  # zeros
    assert abs(q[-1]) < 0.05  # pure noise
    assert (q[:5] > 0.2).all()


def test_free_riders_earn_nothing_even_with_positive_marginal_value():
    base, updates, utility = toy_round()
    names = [f"d{i}" for i in range(len(updates))]
    n = len(updates)
    contribs = score_round(names, updates, [100] * n, [True] * n, [False] * n, base, utility,
                           np.random.default_rng(0))
    policy = RewardPolicy(tokens_per_round=1000)
    rewards = allocate(policy, [score(c, policy) for c in contribs])
    assert sum(rewards) == 1000
    assert rewards[-2] == rewards[-1] == 0
    assert rewards[0] > 0
    # Under FedAvg a zero update shrinks the noisy mean toward the previous model, which can *help* validation
    # loss: the quality gate, not the marginal value, is what stops free riders.
    assert contribs[-2].shapley > 0


def test_flagged_late_and_below_minimum_players_earn_nothing():
    base, updates, utility = toy_round()
    n = len(updates)
    flagged = [False] * n
    flagged[0] = True
    on_time = [True] * n
    on_time[1] = False
    contribs = score_round([f"d{i}" for i in range(n)], updates, [100] * n, on_time, flagged, base, utility,
                           np.random.default_rng(0), exact_up_to=3, max_permutations=50)  # GTG path
    assert contribs[0].shapley == contribs[0].loo == contribs[0].quality == 0.0  # not a player
    policy = RewardPolicy(tokens_per_round=7, min_score=1e-9)
    rewards = allocate(policy, [score(c, policy) for c in contribs])
    assert rewards[0] == rewards[1] == 0 and sum(rewards) == 7
    assert allocate(RewardPolicy(min_score=10.0), [1.0, 2.0]) == [0, 0]


def test_allocate_is_exact_and_deterministic():
    policy = RewardPolicy(tokens_per_round=10)
    assert allocate(policy, [1.0, 1.0, 1.0]) == [4, 3, 3]
    assert allocate(policy, [0.0, 0.0]) == [0, 0]
    rng = np.random.default_rng(3)
    for _ in range(50):
        s = list(rng.exponential(size=7) * (rng.random(7) > 0.3))
        r = allocate(policy, s)
        assert sum(r) == (10 if any(s) else 0) and min(r) >= 0


def test_policy_from_toml_table():
    assert RewardPolicy.from_mapping({"tokens_per_round": 50}).tokens_per_round == 50
    with pytest.raises(ValueError, match="unknown"):
        RewardPolicy.from_mapping({"tokens": 5})
    with pytest.raises(ValueError):
        RewardPolicy(tokens_per_round=-1)
    assert type(RewardPolicy(min_quality=0).min_quality) is float  # encodes as a CBOR float, as the decoder wants


def test_score_is_clipped_shapley():
    c = Contribution("a", 10, True, False, 0.5, 1.0, -2.0)
    assert score(c, RewardPolicy()) == 0.0
    assert score(Contribution("a", 10, True, False, 0.5, 1.0, 2.0), RewardPolicy()) == 2.0
