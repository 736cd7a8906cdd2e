"""Issue 16: the cloud's example-level epsilon is the SMALLEST device's, recomputable within 1 % from what the cloud
persists with dp-accounting alone (RDP and PLD), and the two-level runs of the simulator really credit the devices'
noise (distributed DP) instead of clipping and adding the full central noise on top of it."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from cloud.config import BoundsConfig, PrivacyConfig
from protocol.compression import encode_update
from protocol.messages import CentralDPReport, EdgeAggregate, TrainingPlan, encode, new_nonce, sign_message
from protocol.signing import generate_signing_key

from .harness import dp_accounting_epsilon
from .test_cloud_engine import DENSE, EDGES, NOW, N, engine

PLAN = TrainingPlan(lr=0.05, local_epochs=1, batch_size=32, clip=1.0, noise_mult=1.1)
# per round and edge: (num_samples, num_devices, smallest device's examples): each edge's MEAN device is 100 examples
ROUNDS = [{"edge1": (300, 3, 40), "edge2": (200, 2, 70)},
          {"edge1": (300, 3, 33), "edge2": (200, 2, 90)},
          {"edge1": (300, 3, 40), "edge2": (200, 2, 45)}]


@pytest.fixture(scope="module")
def keys():
    return {name: generate_signing_key() for name in ("cloud", *EDGES)}


def aggregate(keys, edge: str, round_id: int, num_samples: int, num_devices: int, smallest: int,
              central: CentralDPReport | None = None) -> bytes:
    """A signed aggregate of `num_devices` devices whose smallest local dataset is `smallest` examples."""
    agg = EdgeAggregate(
        edge_id=edge, round_id=round_id, base_version=round_id, num_devices=num_devices, num_samples=num_samples,
        weight_sum=float(num_samples), n_params=N, delta=encode_update(np.ones(N, np.float32), DENSE)[0],
        significant=True, central_dp=central, filtered=[], rejected={},
        device_ids=[f"{edge}-d{i}" for i in range(num_devices)], max_device_epsilon=0.1, mean_local_steps=2.0,
        nonce=new_nonce(), timestamp=time.time(), device_bytes=1000, min_device_samples=smallest)
    return encode(sign_message(agg, keys[edge]))



def persisted(run_dir) -> tuple[dict, list[dict]]:
    """The checkpoint's JSON metadata (ledger histories) and rounds.jsonl, read as files, not through cloud code."""
    with np.load(run_dir / "checkpoint.npz", allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes().decode())
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return meta, rounds


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_cloud_derives_the_smallest_devices_epsilon_and_it_recomputes_with_dp_accounting(keys, tmp_path,
                                                                                          accountant):
    run = tmp_path / "run"
    eng = engine(keys, run, bounds=BoundsConfig(norm_multiple=0.0),
                 privacy=PrivacyConfig(accountant=accountant, final_pld=False))
    eng.start(NOW)
    central = CentralDPReport(clip=0.5, noise_mult=2.0, sampling_rate=1.0)
    for i, sizes in enumerate(ROUNDS, start=1):
        for edge in EDGES:
            eng.handle_aggregate(edge, aggregate(keys, edge, i, *sizes[edge], central))
        eng.tick(NOW + i)
    meta, records = persisted(run)
    # what the smallest device (not the mean one: 100 examples) ran each round, from the test's own numbers
    smallest = [min(s[2] for s in sizes.values()) for sizes in ROUNDS]
    want = [[PLAN.noise_mult, PLAN.batch_size / n, math.ceil(n / PLAN.batch_size)] for n in smallest]
    assert meta["ledger"]["device"] == want
    pld = accountant == "pld"
    device = dp_accounting_epsilon(meta["ledger"]["device"], meta["ledger"]["delta"], pld)
    assert records[-1]["epsilon"]["device_derived"] == pytest.approx(device, rel=0.01)
    # the mean device's figure is the underestimate the issue found: well below the smallest device's
    mean = dp_accounting_epsilon([[PLAN.noise_mult, PLAN.batch_size / 100, 4]] * len(ROUNDS), 1e-5, pld)
    assert mean < 0.8 * device
    assert meta["ledger"]["central"] == [[2.0, 1.0, 1]] * len(ROUNDS)
    central_eps = dp_accounting_epsilon(meta["ledger"]["central"], meta["ledger"]["delta"], pld)
    assert records[-1]["epsilon"]["central"] == pytest.approx(central_eps, rel=0.01)


def test_report_json_pld_is_of_the_smallest_device(keys, tmp_path):
    """report.json's PLD figure (cloud.aggregator.write_report, final_pld) recomputes from the checkpoint's history,
    which is the smallest device's."""
    from cloud.accounting import epsilon

    run = tmp_path / "run"
    eng = engine(keys, run, bounds=BoundsConfig(norm_multiple=0.0))
    eng.start(NOW)
    for edge in EDGES:
        eng.handle_aggregate(edge, aggregate(keys, edge, 1, *ROUNDS[0][edge]))
    eng.tick(NOW + 1)
    meta, _ = persisted(run)
    assert meta["ledger"]["device"] == [[1.1, 32 / 40, 2]]
    ours = epsilon(eng.state.ledger.device, 1e-5, "pld")     # what write_report puts in epsilon_pld.device_derived
    assert ours == pytest.approx(dp_accounting_epsilon(meta["ledger"]["device"], 1e-5, pld=True), rel=0.01)


@pytest.fixture(scope="module")
def heart_tiny():
    from experiments.sim.harness import dataset

    return dataset("heart")


def test_simulated_two_level_runs_take_the_credit_path(heart_tiny):
    """The privacy experiment's two-level configuration: every edge credits the devices' post-clip noise (the
    aggregates' credited_noise_mult > 0, the total noise >= the announced z) and the cloud composes the total. With
    the edges' default per-row bounds (which rescale noised rows) the credit is refused: 0."""
    from experiments.privacy import METHOD
    from experiments.sim.harness import simulator
    from experiments.sim.methods import METHODS

    opts = dict(rounds=2, lr=0.1, clip=1.0, noise_mult=1.0, central_clip=0.2, central_noise=2.0, max_steps=1)
    sim = simulator(heart_tiny, METHOD, 0, **opts)
    logs = sim.run()
    records = sim.cloud.state.history   # rounds.jsonl
    sigma = opts["lr"] * opts["noise_mult"] * opts["clip"] / sim.batch   # one device's last-step noise std
    for log, record in zip(logs, records):
        assert log.credited_noise_mult > 0
        # each edge credits sqrt(W) sigma / S for its W equally weighted devices (or less with unequal weights)
        per_edge = record["credited_noise_mult"]
        assert set(per_edge) == set(sim.edges)
        for edge, credited in per_edge.items():
            w = len(record["device_ids"][edge])
            assert 0 < credited <= math.sqrt(w) * sigma / opts["central_clip"] * (1 + 1e-6)
    total = [e.noise_mult for e in sim.cloud.state.ledger.central]
    assert all(z >= opts["central_noise"] - 1e-9 for z in total)
    bounded = simulator(heart_tiny, METHODS["fediomt"].with_(compression=METHOD.compression,
                                                             filters=METHOD.filters), 0, **opts)
    assert all(log.credited_noise_mult == 0 for log in bounded.run())
    # devices that calibrate their own noise ([privacy] calibrate) give it no floor: nothing is credited, the edges
    # clip and add the full z S themselves
    calibrating = simulator(heart_tiny, METHOD, 0, **{**opts, "noise_mult": 4.0}, device_epsilon=5.0)
    logs = calibrating.run()
    assert len(logs) == 2 and all(log.credited_noise_mult == 0 for log in logs)
    assert [e.noise_mult for e in calibrating.cloud.state.ledger.central] == [opts["central_noise"]] * 2


def test_credit_only_adds_no_edge_noise_and_accounts_the_devices_noise(heart_tiny):
    """`--modes credit_only`: central clip announced with noise 0. The edges add nothing, so the ledger's user-level
    mechanism per round is exactly the weakest edge's credited noise, and its epsilon recomputes with dp-accounting
    from those multipliers alone: the user-level guarantee that local DP gives against the cloud for free."""
    from experiments.privacy import METHOD, mode_options
    from experiments.sim.harness import RECIPES, simulator

    opts = mode_options("credit_only", 1.0, RECIPES["heart"], 8, 9, 2, 498, max_steps=1)
    assert opts["central_noise"] == 0.0 and opts["central_clip"] > 0 and opts["noise_mult"] > 0
    sim = simulator(heart_tiny, METHOD, 0, rounds=2, lr=0.1, max_steps=1, **opts)
    logs = sim.run()
    records, ledger = sim.cloud.state.history, sim.cloud.state.ledger
    weakest = [min(r["credited_noise_mult"].values()) for r in records]
    assert all(z > 0 for z in weakest)
    assert [e.noise_mult for e in ledger.central] == pytest.approx(weakest, rel=1e-5)
    eps = dp_accounting_epsilon([(e.noise_mult, e.sample_rate, e.steps) for e in ledger.central], ledger.delta,
                                pld=False)
    assert logs[-1].epsilon_central == pytest.approx(eps, rel=0.01)
