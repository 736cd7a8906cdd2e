"""The trust bounds as pure functions (protocol.bounds, edge.bounds, cloud.rounds.bound_edges), and in the engines:
one device or edge, whatever it sends or claims, moves the model no further than the honest scale (issue 18)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from cloud.config import BoundsConfig as CloudBounds
from cloud.rounds import OpenRound, bound_edges
from edge.bounds import BoundsConfig, check_update, plan_cap, round_bounds
from protocol.bounds import lower_median, reference, remember, scale_to
from protocol.errors import ProtocolError, Reason
from protocol.messages import Ack, TrainingPlan
from protocol.signing import generate_signing_key

from .harness import Fed, aggregate_of, open_round
from .test_cloud_engine import N, admit, aggregate, engine, keys  # noqa: F401 (fixture)

DEFAULTS = dataclasses.asdict(BoundsConfig())   # the harness turns the bounds off for exact-arithmetic tests


def test_lower_median_reference_and_memory():
    assert lower_median([]) == 0.0 and lower_median([3.0]) == 3.0
    assert lower_median([1.0, 1e30]) == 1.0 and lower_median([5.0, 1.0, 3.0, 2.0]) == 2.0
    latest = remember({"a": [1.0], "b": [2.0]}, {"a": [9.0], "c": [0.0]}, limit=2)
    assert list(latest) == ["a", "c"]   # a moved to the recent end, b forgotten
    assert reference({"a": [0.0], "b": [math.inf], "c": [4.0]}, 0) == 4.0   # zeros and inf carry no scale
    np.testing.assert_allclose(scale_to(np.array([1.0, 4.0, 0.0]), 2.0), [1.0, 0.5, 1.0])
    assert (scale_to(np.array([1e30]), 0.0) == 1.0).all()   # 0 = off


def test_plan_cap_is_the_dp_sgd_ceiling():
    plan = TrainingPlan(lr=0.05, local_epochs=2, batch_size=32, clip=1.0, noise_mult=1.1)
    cap = plan_cap(plan, 10_000, 100, lr_scale=0.5, slack=4.0)
    # 8 steps sampling 256 examples in expectation, bounded by 256 + 7 * 16 + 10 (Poisson steps can exceed b)
    assert cap == pytest.approx(4.0 * 0.025 * (378 + 8 * 1.1 * 100) / 32)
    assert plan_cap(TrainingPlan(0.05, 1, 32, 1.0, 0.0), 10_000, 100, 1.0, 4.0) == math.inf   # no DP noise
    assert plan_cap(TrainingPlan(0.05, 5, 32, 1.0, 1.1, max_steps=3), 1, 1000, 1.0, 1.0) == pytest.approx(
        0.05 * (96 + 7 * math.sqrt(96) + 10 + 3 * 1.1) / 32)


def test_plan_cap_holds_for_poisson_steps_that_sample_more_than_the_batch():
    """An honest Poisson round whose per-example gradients all point the same way (the worst case) often samples
    more than steps * b examples; the cap (slack 1) still holds, where steps * lr * C * (1 + z sqrt(d) / b), the
    fixed-batch ceiling, does not."""
    plan = TrainingPlan(lr=0.1, local_epochs=1, batch_size=8, clip=1.0, noise_mult=0.01)
    n, d, rng = 40, 20, np.random.default_rng(0)
    steps = math.ceil(n / plan.batch_size)
    cap = plan_cap(plan, d, n, lr_scale=1.0, slack=1.0)
    fixed = steps * plan.lr * plan.clip * (1 + plan.noise_mult * math.sqrt(d) / plan.batch_size)
    over = 0
    for _ in range(2000):
        sampled = int((rng.random((steps, n)) < plan.batch_size / n).sum())
        noise = rng.normal(0.0, plan.noise_mult * plan.clip, (steps, d)).sum(0)
        delta = plan.lr * (np.eye(d)[0] * sampled * plan.clip + noise) / plan.batch_size
        assert np.linalg.norm(delta) <= cap
        over += np.linalg.norm(delta) > fixed
    assert over > 500   # the fixed-batch ceiling would refuse honest devices


def test_admission_refuses_huge_counts_and_norms_with_bad_value():
    cfg = BoundsConfig(max_samples=1000, max_norm=10.0)
    check_update(9.0, 1000, math.inf, cfg)
    for norm, n, cap in ((1.0, 2**63 - 1, math.inf), (11.0, 1, math.inf), (5.0, 1, 4.0), (math.nan, 1, 4.0)):
        with pytest.raises(ProtocolError) as err:
            check_update(norm, n, cap, cfg)
        assert err.value.reason == Reason.BAD_VALUE


def test_one_device_of_two_is_bounded_by_the_other():
    cfg = BoundsConfig(norm_multiple=2.0, samples_multiple=2.0)
    b = round_bounds(["h", "x"], np.array([0.5, 1e31]), np.array([100.0, 9e18]), {}, cfg)
    assert b.norm_bound == 1.0 and b.factors[0] == 1.0 and b.factors[1] * 1e31 == pytest.approx(1.0)
    np.testing.assert_array_equal(b.samples, [100.0, 200.0])
    # remembered honest devices keep the reference when the attacker is alone in a round
    alone = round_bounds(["x"], np.array([1e31]), np.array([9e18]), b.latest, cfg)
    assert alone.norm_bound == 1.0 and alone.samples[0] == 200.0
    # an attacker can only lower the reference, never raise it; a zero delta does not switch the bound off
    low = round_bounds(["h", "x"], np.array([0.5, 0.0]), np.array([100.0, 0.0]), {}, cfg)
    assert low.norm_bound == 1.0


def test_edge_engine_bounds_a_1e30_update_at_a_two_device_edge(tmp_path):
    fed = Fed(tmp_path, n_devices=2, bounds=DEFAULTS)
    eng = fed.engine()
    open_round(fed, eng)
    honest = np.full(fed.n_params, 0.01, np.float32)
    ack, _ = eng.handle_update("d01", fed.update("d01", np.full(fed.n_params, 1e30, np.float32)))
    assert ack.accepted
    ack, pubs = eng.handle_update("d00", fed.update("d00", honest, num_samples=1000))
    agg, mean = aggregate_of(fed, pubs)   # defaults: the norms and counts of both at most the smaller one's
    assert np.isfinite(mean).all() and np.linalg.norm(mean) <= np.linalg.norm(honest) * (1 + 1e-6)
    assert agg.num_samples == 20 and agg.update_norms["d01"] == pytest.approx(np.linalg.norm(honest), 1e-5)


def test_a_forged_update_after_its_round_closed_is_not_acked_as_a_duplicate(tmp_path):
    fed = Fed(tmp_path, n_devices=1)
    eng = fed.engine()
    open_round(fed, eng)
    delta = np.full(fed.n_params, 0.01, np.float32)
    ack, pubs = eng.handle_update("d00", fed.update("d00", delta))
    assert ack.accepted and pubs   # the round closed at its quorum
    forged: Ack = eng.handle_update("d00", fed.update("d00", delta, key=generate_signing_key()))[0]
    assert not forged.accepted and forged.reason == int(Reason.BAD_SIGNATURE)
    again: Ack = eng.handle_update("d00", fed.update("d00", delta))[0]   # a genuine late copy: counted once
    assert again.accepted and again.reason == int(Reason.DUPLICATE)


def test_cloud_bounds_an_implausible_edge_and_caps_its_weight(keys):  # noqa: F811
    rnd = OpenRound(1, 1, N, set(), set(), max_samples=1000)
    honest = admit(aggregate(keys, "edge1", delta=np.full(N, 0.1), num_samples=200), "edge1",
                   lambda e: keys[e].public_key(), rnd)
    bad = admit(aggregate(keys, "edge2", delta=np.full(N, 1e30), num_samples=2000), "edge2",
                lambda e: keys[e].public_key(), rnd)
    out, notes, latest = bound_edges({"edge1": honest, "edge2": bad}, {}, 100.0, CloudBounds())
    ref = float(np.linalg.norm(honest.delta))
    assert np.linalg.norm(out["edge2"].delta) == pytest.approx(4 * ref, rel=1e-5)
    assert out["edge2"].agg.num_samples == 4 * 100 * 2 and out["edge2"].agg.weight_sum == 800.0
    assert set(notes) == {"edge2"} and out["edge1"] is honest and set(latest) == {"edge1", "edge2"}
    # the model's own norm bounds the first round when every edge is implausible
    out, _, _ = bound_edges({"edge2": bad}, {}, 2.0, CloudBounds())
    assert np.linalg.norm(out["edge2"].delta) == pytest.approx(20.0, rel=1e-5)   # model_ratio 10
    with pytest.raises(ProtocolError) as err:   # more than max_samples per device: refused
        admit(aggregate(keys, "edge1", delta=np.full(N, 0.1), num_samples=2**63 - 1), "edge1",
              lambda e: keys[e].public_key(), rnd)
    assert err.value.reason == Reason.BAD_VALUE


def test_cloud_engine_model_stays_finite_and_bounded(keys, tmp_path):  # noqa: F811
    initial = np.full(N, 0.5, np.float32)
    eng = engine(keys, tmp_path, initial=initial)
    eng.start(1e6)
    eng.handle_aggregate("edge1", aggregate(keys, "edge1", delta=np.full(N, 0.01)))
    eng.tick(1e6)
    eng.handle_aggregate("edge2", aggregate(keys, "edge2", delta=np.full(N, 3e38)), 1e6)
    weights = eng.state.server.weights
    assert np.isfinite(weights).all()
    assert np.linalg.norm(weights - initial) <= np.linalg.norm(initial)   # 4x the honest edge: far below |w|
    assert eng.state.history[-1]["bounded_at_cloud"]["edge2"]["norm_factor"] < 1e-30
