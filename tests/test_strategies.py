"""Strategies and heterogeneity control as pure functions: known deltas in, hand-computed models out."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.strategies import STRATEGIES, make
from cloud.strategies.base import DeviceInfo, EdgeResult, RoundDefaults
from cloud.strategies.heterogeneity import (
    deadline_steps,
    fednova_combine,
    importance_sample,
    inclusion_probabilities,
    lr_scales,
    observe,
    systematic_sample,
)
from protocol.messages import CentralDPReport, TrainingPlan

PLAN = TrainingPlan(lr=0.1, local_epochs=1, batch_size=8, clip=1.0, noise_mult=1.0)
DEFAULTS = RoundDefaults(PLAN, {"method": "topk"}, CentralDPReport(clip=0.5, noise_mult=1.0, sampling_rate=1.0),
                         round_seconds=10.0)


def result(edge, delta, n, weight=None, devices=1, steps=0.0, control=None):
    return EdgeResult(edge, None if delta is None else np.asarray(delta, np.float32), n,
                      float(n if weight is None else weight), devices, steps,
                      None if control is None else np.asarray(control, np.float32))


def test_fedavg_weights_edges_by_samples_and_counts_insignificant_edges_as_zero():
    s = make("fedavg", DEFAULTS)
    state = s.init_state(np.array([1.0, 1.0], np.float32))
    new = s.apply(state, [result("a", [1.0, 0.0], 30), result("b", [0.0, 2.0], 10), result("c", None, 20)], 10)
    np.testing.assert_allclose(new.weights, [1.0 + 30 / 60, 1.0 + 20 / 60], rtol=1e-6)
    assert state.weights.tolist() == [1.0, 1.0]  # pure: the input state is untouched


def test_server_lr_scales_the_step():
    s = make("fedavg", DEFAULTS, {"server_lr": 0.5})
    new = s.apply(s.init_state(np.zeros(2, np.float32)), [result("a", [2.0, -4.0], 1)], 1)
    np.testing.assert_allclose(new.weights, [1.0, -2.0])


def test_fedprox_puts_mu_in_the_plan():
    cfg = make("fedprox", DEFAULTS, {"mu": 0.3}).configure_round(None, 1, {}, np.random.default_rng(0))
    assert cfg.plan.mu == 0.3 and cfg.plan.lr == PLAN.lr and cfg.cohort == []


def test_fedadam_step_equals_a_hand_computed_adam_step():
    s = make("fedadam", DEFAULTS, {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3})
    state = s.init_state(np.array([0.5, -0.5, 0.0], np.float32))
    d1, d2 = np.array([0.2, -0.1, 0.0]), np.array([0.1, 0.3, -0.2])
    state = s.apply(state, [result("a", d1, 5)], 1)
    state = s.apply(state, [result("a", d2, 5)], 1)
    m1, v1 = 0.1 * d1, 0.01 * d1**2
    w1 = np.array([0.5, -0.5, 0.0]) + 0.1 * m1 / (np.sqrt(v1) + 1e-3)
    m2, v2 = 0.9 * m1 + 0.1 * d2, 0.99 * v1 + 0.01 * d2**2
    w2 = w1 + 0.1 * m2 / (np.sqrt(v2) + 1e-3)
    np.testing.assert_allclose(state.weights, w2, rtol=1e-5)
    np.testing.assert_allclose(state.arrays["opt_m"], m2, rtol=1e-5)
    np.testing.assert_allclose(state.arrays["opt_v"], v2, rtol=1e-5)


def test_server_momentum_accumulates_the_deltas():
    """FedAvgM: u = beta u + d, w += lr u; the velocity is checkpointed state."""
    s = make("fedavg", DEFAULTS, {"server_optimizer": "momentum", "server_lr": 0.5, "server_momentum": 0.9})
    state = s.init_state(np.zeros(2, np.float32))
    for _ in range(2):
        state = s.apply(state, [result("a", np.array([1.0, -2.0]), 5)], 1)
    np.testing.assert_allclose(state.arrays["opt_momentum"], [1.9, -3.8], rtol=1e-6)
    np.testing.assert_allclose(state.weights, 0.5 * np.array([1.0, -2.0]) + 0.5 * np.array([1.9, -3.8]), rtol=1e-6)


def test_yogi_second_moment_moves_additively():
    s = make("fedavg", DEFAULTS, {"server_optimizer": "yogi", "server_lr": 0.1, "beta2": 0.9})
    state = s.init_state(np.zeros(2, np.float32))
    d = np.array([0.2, -0.4])
    state = s.apply(state, [result("a", d, 5)], 1)
    np.testing.assert_allclose(state.arrays["opt_v"], 0.1 * d**2, rtol=1e-6)   # v < d^2: v += (1 - b2) d^2
    state = s.apply(state, [result("a", np.zeros(2), 5)], 1)
    np.testing.assert_allclose(state.arrays["opt_v"], 0.1 * d**2, rtol=1e-6)   # d = 0: sign(v) * 0, unchanged


@pytest.mark.parametrize("name", ["fediomt", "scaffold", "fedprox"])
def test_every_strategy_composes_with_a_server_optimiser(name):
    """The optimiser's state lives beside the strategy's own (SCAFFOLD's control variate survives the step)."""
    s = make(name, DEFAULTS, {"server_optimizer": "adam", "server_lr": 0.05})
    state = s.init_state(np.zeros(3, np.float32))
    d = np.array([0.1, 0.0, -0.1])
    moved = s.apply(state, [result("a", d, 5, steps=2.0)], 4)
    assert {"opt_m", "opt_v"} <= set(moved.arrays) and set(state.arrays) <= set(moved.arrays)
    np.testing.assert_allclose(moved.weights, 0.05 * (0.1 * d) / (np.sqrt(0.01 * d**2) + 1e-3), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="server_optimizer"):
        make(name, DEFAULTS, {"server_optimizer": "lion"})


def test_scaffold_updates_the_server_control_by_the_participating_fraction():
    s = make("scaffold", DEFAULTS)
    cfg = s.configure_round(None, 1, {}, np.random.default_rng(0))
    assert cfg.plan.scaffold
    state = s.init_state(np.zeros(2, np.float32))
    state = s.apply(state, [result("a", [1.0, 1.0], 10, devices=2, control=[1.0, 0.0]),
                            result("b", [0.0, 0.0], 10, devices=2, control=[0.0, 2.0])], population=8)
    np.testing.assert_allclose(state.weights, [0.5, 0.5])
    np.testing.assert_allclose(state.arrays["control"], 4 / 8 * np.array([0.5, 1.0]))


def test_inclusion_probabilities_sum_to_m_capped_at_one():
    pi = inclusion_probabilities(np.array([100.0, 1, 1, 1, 1]), 3, uniform_mix=0.0)
    assert pi[0] == 1.0 and abs(pi.sum() - 3) < 1e-9 and np.allclose(pi[1:], 0.5)


def test_systematic_sampling_has_the_announced_inclusion_probabilities():
    rng = np.random.default_rng(1)
    pi = inclusion_probabilities(rng.random(10) + 0.1, 4)
    counts = np.zeros(10)
    for _ in range(20000):
        chosen = systematic_sample(pi, rng)
        assert chosen.size == 4 and np.unique(chosen).size == 4
        counts[chosen] += 1
    np.testing.assert_allclose(counts / 20000, pi, atol=0.015)


def test_importance_sampling_reweighting_is_unbiased_in_expectation():
    rng = np.random.default_rng(2)
    n = 12
    updates = rng.normal(size=(n, 3)) * rng.uniform(0.1, 3.0, size=(n, 1))
    devices = {f"d{i}": DeviceInfo(f"d{i}", norm=float(np.linalg.norm(updates[i]))) for i in range(n)}
    index = {f"d{i}": i for i in range(n)}
    estimates = []
    for _ in range(20000):
        cohort, weight = importance_sample(devices, 4, rng)
        assert len(cohort) == 4 and set(cohort) == set(weight)
        estimates.append(sum(weight[d] * updates[index[d]] for d in cohort))
    estimates = np.array(estimates)
    se = estimates.std(axis=0) / np.sqrt(len(estimates))
    assert np.all(np.abs(estimates.mean(axis=0) - updates.mean(axis=0)) < 4 * se + 1e-9)


def test_lr_scales_and_deadline_steps():
    devs = [DeviceInfo("w", "wearable", quality=1.0), DeviceInfo("p", "pi", quality=0.5),
            DeviceInfo("x", "toaster", quality=0.0)]
    assert lr_scales(devs, {"wearable": 0.5, "pi": 1.0}, min_quality=0.2) == {"w": 0.5, "p": 0.5, "x": 0.2}
    assert deadline_steps([10.0, 0.0, 30.0, 20.0], round_seconds=10, fraction=0.5) == 100
    assert deadline_steps([0.0], 10) == 0


def test_fednova_normalises_by_local_steps():
    fast, slow = result("a", [4.0], 1, steps=4.0), result("b", [1.0], 1, steps=1.0)
    # both edges moved 1.0 per step; FedNova keeps that direction at the average number of steps (2.5)
    np.testing.assert_allclose(fednova_combine([fast, slow], [1.0, 1.0], 1), [2.5])
    # an edge without a step count falls back to the plain weighted mean
    np.testing.assert_allclose(fednova_combine([fast, result("b", [1.0], 1)], [1.0, 1.0], 1), [2.5])


def test_observe_tracks_norms_and_filter_flags():
    devices = observe({}, ["a", "b"], filtered=["b"], update_norms={"a": 2.0, "b": 8.0})
    devices = observe(devices, ["a"], filtered=[], update_norms={"a": 4.0})
    assert devices["a"].norm == 3.0 and devices["a"].quality == 1.0 and devices["a"].rounds == 2
    assert devices["b"].norm == 8.0 and devices["b"].quality == 0.5


def test_fediomt_configures_a_sampled_cohort_with_lr_scales_steps_and_central_dp():
    s = make("fediomt", DEFAULTS, {"cohort_size": 3, "class_lr": {"wearable": 0.5}})
    devices = {f"d{i}": DeviceInfo(f"d{i}", "wearable" if i % 2 else "pi", steps_per_s=10.0, norm=1.0 + i)
               for i in range(6)}
    cfg = s.configure_round(s.init_state(np.zeros(2, np.float32)), 1, devices, np.random.default_rng(0))
    assert len(cfg.cohort) == 3 and set(cfg.sample_weight) == set(cfg.cohort) == set(cfg.lr_scale)
    assert all(cfg.lr_scale[d] == (0.5 if int(d[1:]) % 2 else 1.0) for d in cfg.cohort)
    assert cfg.plan.max_steps == 50  # 10 steps/s * 10 s * 0.5
    assert cfg.central_dp.sampling_rate == 0.5 and cfg.central_dp.noise_mult == 1.0


def test_fediomt_ablations_switch_features_off():
    off = {"importance_sampling": False, "adaptive_lr": False, "adaptive_steps": False, "fednova": False}
    s = make("fediomt", DEFAULTS, {"cohort_size": 3, **off})
    devices = {f"d{i}": DeviceInfo(f"d{i}", "wearable", steps_per_s=10.0) for i in range(6)}
    cfg = s.configure_round(None, 1, devices, np.random.default_rng(0))
    assert cfg.cohort == [] and cfg.lr_scale == {} and cfg.sample_weight == {} and cfg.plan == PLAN
    new = s.apply(s.init_state(np.zeros(1, np.float32)), [result("a", [4.0], 3, steps=4.0),
                                                          result("b", [1.0], 1, steps=1.0)], 6)
    np.testing.assert_allclose(new.weights, [3.25])  # plain sample-weighted mean, no step normalisation


def test_unknown_strategy_or_option_is_a_clear_error():
    assert set(STRATEGIES) == {"fedavg", "fedprox", "scaffold", "fedadam", "fediomt"}
    with pytest.raises(ValueError, match="unknown strategy"):
        make("fedsgd", DEFAULTS)
    with pytest.raises(ValueError, match="fedadam"):
        make("fedadam", DEFAULTS, {"momentum": 0.9})


def test_fediomt_lr_decay_anneals_the_announced_lr_along_a_half_cosine():
    from cloud.strategies.fediomt import cosine_lr_factor

    s = make("fediomt", DEFAULTS, {"lr_decay_rounds": 5, "lr_floor": 0.2, "adaptive_steps": False})
    devices = {"d0": DeviceInfo("d0", "wearable")}
    lrs = [s.configure_round(None, r, devices, np.random.default_rng(0)).plan.lr for r in (1, 2, 3, 5, 9)]
    # round 3 is half-way: 0.2 + 0.8 * 0.5 = 0.6 of plan.lr; round 2: 0.2 + 0.8 * (1 + cos(pi/4)) / 2
    np.testing.assert_allclose(lrs, [0.1, 0.1 * (0.2 + 0.4 * (1 + np.sqrt(0.5))), 0.06, 0.02, 0.02], rtol=1e-6)
    assert make("fediomt", DEFAULTS, {"adaptive_steps": False}).configure_round(None, 40, devices,
                                                                                np.random.default_rng(0)).plan == PLAN
    assert cosine_lr_factor(7, 1, 0.1) == 1.0
    with pytest.raises(ValueError, match="lr_floor"):
        make("fediomt", DEFAULTS, {"lr_decay_rounds": 5, "lr_floor": 0.0})
