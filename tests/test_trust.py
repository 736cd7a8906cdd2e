"""The cloud's trust gate (cloud.trust, issue 18): an edge whose result points away from the cloud's root update is
left out; directly on numpy arrays, through CloudEngine with signed aggregates, and with the real root update (the
firmware model's TFLite training graph on a root set)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cloud.config import BoundsConfig, StrategyConfig
from cloud.strategies.base import EdgeResult
from cloud.trust import (
    TrustConfig,
    TrustGate,
    agree,
    cosine,
    device_cosines,
    gate,
    leave_out,
    majority_direction,
    root_gate,
    sketch_cosines,
    weightless,
)
from protocol.errors import ProtocolError, Reason
from protocol.messages import GlobalModel, RoundAnnouncement, bytes_to_floats, decode
from protocol.signing import generate_signing_key
from protocol.sketch import decode_sketches, sketch, unit_sketches

from .test_cloud_engine import EDGES, NOW, PLAN, N, aggregate, engine, model


@pytest.fixture(scope="module")
def keys():
    return {name: generate_signing_key() for name in ("cloud", *EDGES)}


def result(edge: str, delta) -> EdgeResult:
    return EdgeResult(edge, None if delta is None else np.asarray(delta, np.float32), 10, 10.0, 2)


def test_gate_leaves_out_only_what_points_away_from_the_reference():
    ref = np.array([1.0, 1.0, 0.0])
    results = [result("a", [2.0, 1.0, 0.0]), result("b", [-1.0, -0.5, 0.3]), result("c", [0.0, 0.0, 1.0]),
               result("d", None)]
    kept, dropped = gate(results, ref, 0.0)
    assert [r.edge_id for r in kept] == ["a", "d"]                  # no delta (no devices): nothing to judge
    assert set(dropped) == {"b", "c"} and dropped["b"] < 0 and dropped["c"] == 0.0   # orthogonal: <= 0
    assert [r.edge_id for r in gate(results, ref, -0.5)[0]] == ["a", "c", "d"]
    assert gate(results, np.zeros(3), 0.0) == (results, {})           # nothing to compare with: keep all
    assert cosine(np.array([np.nan, 1.0]), np.array([1.0, 0.0])) == 0.0   # a non-finite delta earns no trust
    with pytest.raises(ValueError):
        TrustConfig(min_cosine=1.0)


def test_the_engine_applies_only_the_trusted_edge_and_records_the_other(keys, tmp_path):
    """A captured edge sends the honest direction reversed: the model follows the honest edge alone, the round
    record names the distrusted edge and its cosine; both edges' devices are still accounted."""
    honest = np.linspace(1.0, 2.0, N).astype(np.float32)
    seen = []

    def reference(weights, plan):
        seen.append((weights.copy(), plan.lr))
        return honest * 0.5 + 0.01

    eng = engine(keys, tmp_path / "run", bounds=BoundsConfig(norm_multiple=0.0))
    eng.trust = TrustGate(reference, 0.0)
    eng.start(NOW)
    eng.handle_aggregate("edge1", aggregate(keys, "edge1", delta=honest, num_samples=10))
    eng.handle_aggregate("edge2", aggregate(keys, "edge2", delta=-3 * honest, num_samples=30))
    new = model(keys, eng.tick(NOW + 1))
    np.testing.assert_allclose(bytes_to_floats(new.weights, N), honest, rtol=1e-6)   # edge2 would give -2.25x
    (record,) = eng.state.history
    assert list(record["distrusted_at_cloud"]) == ["edge2"] and record["distrusted_at_cloud"]["edge2"] < -0.99
    assert record["num_devices"] == 4                                  # the privacy spend of all four is counted
    assert len(seen) == 1 and not seen[0][0].any() and seen[0][1] == 0.05   # from the round's weights and plan


def test_every_edge_distrusted_leaves_the_model_unchanged(keys, tmp_path):
    eng = engine(keys, tmp_path / "run", bounds=BoundsConfig(norm_multiple=0.0),
                 strategy=StrategyConfig("fedadam", {"server_lr": 0.1}))
    eng.trust = TrustGate(lambda w, plan: np.ones(N, np.float32), 0.0)
    eng.start(NOW)
    for edge in EDGES:
        eng.handle_aggregate(edge, aggregate(keys, edge, delta=-np.ones(N, np.float32)))
    new: GlobalModel = model(keys, eng.tick(NOW + 1))
    assert not bytes_to_floats(new.weights, N).any()                  # no optimiser step on an empty round
    assert set(eng.state.history[0]["distrusted_at_cloud"]) == set(EDGES)


def test_the_root_update_is_the_firmware_models_own_training_on_the_root_set():
    """root_gate trains the real TFLite graph (device.training.train_round, no clip, no noise) from the given
    weights: an edge sending that update reversed is distrusted, one sending a noisy copy is kept."""
    from device.runtime import TrainableModel
    from experiments.sim.models import initial_weights, trainable
    from protocol.messages import TrainingPlan

    model_bytes, manifest = trainable("vitals_mlp", 8, n_features=6)
    tfl = TrainableModel(model_bytes, manifest, rng=np.random.default_rng(0), num_threads=1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    g = root_gate(tfl, x, y, TrustConfig(), np.random.default_rng(2))
    w0 = np.asarray(initial_weights("vitals_mlp", 0, n_features=6), np.float32)
    ref = g.reference(w0, TrainingPlan(lr=0.1, local_epochs=2, batch_size=8, clip=0.1, noise_mult=5.0))
    assert ref.shape == w0.shape and np.isfinite(ref).all() and np.linalg.norm(ref) > 0
    again = g.reference(w0, TrainingPlan(lr=0.1, local_epochs=2, batch_size=8, clip=0.1, noise_mult=5.0))
    assert cosine(ref, again) > 0.8                                     # no DP noise: the same direction
    kept, dropped = gate([result("honest", ref + 0.2 * np.linalg.norm(ref) / np.sqrt(ref.size)
                                 * rng.standard_normal(ref.size)), result("captured", -ref)], again, 0.0)
    assert [r.edge_id for r in kept] == ["honest"] and list(dropped) == ["captured"]
    with pytest.raises(ValueError, match="fewer than one batch"):
        root_gate(tfl, x[:4], y[:4], TrustConfig(), rng)


# ------------------------------------------------------------------ the device-majority gate (protocol.sketch)
def devices(rng, direction: np.ndarray, n: int, sign: float = 1.0) -> list[np.ndarray]:
    """n non-IID device updates around `direction` (reversed by sign -1: sign-flipping attackers)."""
    return [(sign * (direction + 0.8 * rng.normal(size=direction.size))).astype(np.float32) for _ in range(n)]


def test_count_sketches_keep_cosines_and_the_wire_form_is_checked():
    rng = np.random.default_rng(0)
    a = rng.normal(size=5000)
    errors = []
    for _ in range(50):
        b = 0.6 * a + rng.normal(size=5000)   # cosine ~0.5 to a
        errors.append(cosine(sketch(a, 64), sketch(b, 64)) - cosine(a, b))
    assert abs(np.mean(errors)) < 0.05 and np.std(errors) < 0.2      # unbiased, ~1/sqrt(64) spread
    idx = np.array([3, 17, 4999])
    sparse = np.zeros(5000)
    sparse[idx] = [1.0, -2.0, 0.5]
    np.testing.assert_allclose(sketch(np.array([1.0, -2.0, 0.5]), 64, idx, 5000), sketch(sparse, 64))
    rows = decode_sketches(unit_sketches([(None, a), (idx, np.array([1.0, -2.0, 0.5])), (None, np.zeros(5000))],
                                         5000, 64), 64, 3)
    assert rows.shape == (3, 64) and np.allclose(np.linalg.norm(rows[:2], axis=1), 1.0, atol=0.02)
    assert not rows[2].any()                                          # a zero update: no direction
    for data, dims, most, reason in ((b"\x01" * 65, 64, 3, Reason.BAD_SHAPE), (b"\x01" * 192, 64, 2, Reason.BAD_VALUE),
                                     (b"\x01" * 64, 0, 3, Reason.BAD_SHAPE)):
        with pytest.raises(ProtocolError) as err:
            decode_sketches(data, dims, most)
        assert err.value.reason == reason


def test_the_device_majority_outvotes_an_edge_its_attackers_hold():
    """Edge b: 3 sign-flipping attackers and 2 honest devices, so b's own filters side with the attackers and its
    aggregate points backwards; across both edges the 7 honest devices are the majority, and b is left out."""
    rng = np.random.default_rng(1)
    g = rng.normal(size=3000)
    edge_a = devices(rng, g, 5)
    edge_b = devices(rng, g, 3, -1.0) + devices(rng, g, 2)
    sk = {e: decode_sketches(unit_sketches([(None, u) for u in ups], g.size, 64), 64, 5)
          for e, ups in (("a", edge_a), ("b", edge_b))}
    results = [result("a", np.mean(edge_a, axis=0)), result("b", np.mean(edge_b[:3], axis=0)), result("c", None)]
    reference = majority_direction(sk)
    cosines = sketch_cosines(results, reference, 64)
    assert cosines["a"] > 0.3 and cosines["b"] < -0.3 and "c" not in cosines
    kept, dropped = leave_out(results, cosines, 0.0)
    assert [r.edge_id for r in kept] == ["a", "c"] and list(dropped) == ["b"]
    # device by device: the three attackers point against the majority, the two honest ones with it
    ids_b = ["b0", "b1", "b2", "b3", "b4"]
    verdicts = device_cosines(sk["b"], ids_b, reference)
    assert {d for d, c in verdicts.items() if c <= 0} == {"b0", "b1", "b2"}
    assert min(verdicts["b3"], verdicts["b4"]) > 0.3
    assert device_cosines(sk["b"], ids_b[:4], reference) == {}   # rows and ids disagree: no verdict
    assert majority_direction({"a": sk["a"]}) is None                  # one edge's devices cannot outvote it
    assert majority_direction({"a": sk["a"], "b": np.zeros((0, 64))}) is None
    assert sketch_cosines(results, None, 64) == {}


def test_a_device_weighs_nothing_while_its_mean_agreement_points_against_the_majority():
    """Once against the majority is an honest device with unusual data: still counted. A sign flipper is against it
    for as long as the model learns from the others; once the model has moved away from its data, its flipped
    update agrees with the majority now and then (EXPERIMENTS.md "Poisoning"), but its mean stays negative."""
    devices = agree({}, {"honest": -0.4, "flipper": -0.8})
    assert devices["honest"].verdicts == 1 and weightless(devices, [], 0.0) == []   # one verdict is not enough
    flipper_late = [-0.6, -0.5, -0.3, 0.1, 0.2, 0.15, 0.3]
    for c in flipper_late:
        devices = agree(devices, {"honest": 0.5, "flipper": c})
    assert devices["flipper"].verdicts == 8 and devices["flipper"].agreement == pytest.approx(
        np.mean([-0.8, *flipper_late]))
    assert weightless(devices, [{}, {}], 0.0) == ["flipper"]   # its last two rounds agreed: the streak is broken
    assert weightless(devices, [{}, {}], -0.5) == []   # min_cosine loosens it
    for _ in range(30):   # a device that keeps agreeing earns its weight back
        devices = agree(devices, {"flipper": 0.3})
    assert weightless(devices, [{}, {}], 0.0) == []


def test_a_device_captured_after_a_long_honest_history_weighs_nothing_after_two_rounds_against():
    """Its mean would take as many rounds to turn as it was honest; two rounds running against the majority is
    enough. Once against is not (an honest device with unusual data)."""
    devices = {}
    for _ in range(50):
        devices = agree(devices, {"sleeper": 0.6, "other": 0.5})
    devices = agree(devices, {"sleeper": -0.7, "other": -0.2})
    assert weightless(devices, [{"other": -0.2}, {"sleeper": -0.7, "other": -0.2}], 0.0) == ["other"]
    devices = agree(devices, {"sleeper": -0.8, "other": 0.4})
    recent = [{"sleeper": -0.7, "other": -0.2}, {"sleeper": -0.8}]
    assert devices["sleeper"].agreement > 0.5 and weightless(devices, recent, 0.0) == ["sleeper"]
    assert weightless(devices, recent[-1:], 0.0) == []   # one round's verdicts are not a streak


def test_the_engine_leaves_out_the_edge_against_the_devices_majority_by_default(keys, tmp_path):
    rng = np.random.default_rng(2)
    g = rng.normal(size=N)
    honest, attackers = devices(rng, g, 2), devices(rng, g, 2, -1.0)
    no_dp = dataclasses.replace(PLAN, noise_mult=0.0)   # under device DP-SGD the gate stays off (below)
    eng = engine(keys, tmp_path / "run", bounds=BoundsConfig(norm_multiple=0.0), plan=no_dp)   # no root set
    eng.start(NOW)
    announced = []
    for round_id in (1, 2):
        for edge, ups, delta, filtered in (("edge1", honest + honest[:1], np.mean(honest, axis=0), ["x"]),
                                           ("edge2", attackers, np.mean(attackers, axis=0), [])):
            eng.handle_aggregate(edge, aggregate(keys, edge, round_id, round_id, delta=delta, sketch_dims=64,
                                                 sketches=unit_sketches([(None, u) for u in ups], N, 64),
                                                 num_devices=2, filtered=filtered))
        announced.append(decode(eng.tick(NOW + round_id)[-1].payload, expect=RoundAnnouncement))
    record = eng.state.history[0]
    assert list(record["distrusted_at_cloud"]) == ["edge2"], record["distrusted_at_cloud"]
    assert set(record["distrusted_devices"]) == {"edge2-d1", "edge2-d2"}
    assert eng.state.devices["edge2-d1"].agreement < 0 < eng.state.devices["edge1-d1"].agreement
    # against the majority once: still counted (an honest device with unusual data); on average over two: weight 0
    assert announced[0].round_id == 2 and announced[0].sample_weight == {}
    assert announced[1].round_id == 3 and announced[1].sample_weight == {"edge2-d1": 0.0, "edge2-d2": 0.0}
    # more sketches than the edge admitted updates (num_devices + filtered): refused at admission
    eng.handle_aggregate("edge1", aggregate(keys, "edge1", 3, 3, delta=g, sketch_dims=64,
                                            sketches=unit_sketches([(None, g)] * 3, N, 64)))
    assert eng.rejected == {"BAD_VALUE": 1}
    dp = engine(keys, tmp_path / "dp", bounds=BoundsConfig(norm_multiple=0.0))   # PLAN: noise_mult 1.1
    dp.start(NOW)
    for edge, ups, delta in (("edge1", honest, np.mean(honest, axis=0)),
                             ("edge2", attackers, np.mean(attackers, axis=0))):
        dp.handle_aggregate(edge, aggregate(keys, edge, delta=delta, sketch_dims=64,
                                            sketches=unit_sketches([(None, u) for u in ups], N, 64),
                                            num_devices=2))
    dp.tick(NOW + 1)
    assert dp.state.history[0]["distrusted_at_cloud"] == {}
