"""The cloud's trust gate (cloud.trust, issue 18): an edge whose result points away from the cloud's root update is
left out; directly on numpy arrays, through CloudEngine with signed aggregates, and with the real root update (the
firmware model's TFLite training graph on a root set)."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.config import BoundsConfig, StrategyConfig
from cloud.strategies.base import EdgeResult
from cloud.trust import TrustConfig, TrustGate, cosine, gate, root_gate
from protocol.messages import GlobalModel, bytes_to_floats
from protocol.signing import generate_signing_key

from .test_cloud_engine import EDGES, NOW, N, aggregate, engine, model


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
