"""Direct tests of the simulator's pure parts (heterogeneity model, poisoning, attacks, DP calibration) and of one
small simulated federation: every byte counted is a real encoded message, late updates are refused, malicious
devices are the configured share."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cloud.accounting import Entry, epsilon
from experiments.attacks import (
    Outputs,
    balance,
    best_threshold,
    loss_threshold_attack,
    shadow_attack,
    threshold_accuracy,
)
from experiments.privacy import calibrate
from experiments.sim import hetero
from experiments.sim.poison import Poison, flip_labels, malicious, poison_delta


def test_gamma_speeds_have_the_requested_mean_and_cv():
    rng = np.random.default_rng(0)
    assert np.all(hetero.gamma_speeds(10, 5.0, 0.0, rng) == 5.0)
    for cv in (0.25, 0.5, 1.0):
        s = hetero.gamma_speeds(200_000, 10.0, cv, rng)
        assert s.mean() == pytest.approx(10.0, rel=0.02)
        assert hetero.coefficient_of_variation(s) == pytest.approx(cv, rel=0.03)


def test_profiles_classes_follow_speed_and_offline_rate():
    rng = np.random.default_rng(1)
    profiles = hetero.draw_profiles(300, hetero.HeteroConfig(cv=1.0), rng)
    by_class = {c: np.mean([p.steps_per_s for p in profiles if p.compute_class == c]) for c in hetero.CLASSES}
    assert by_class["wearable"] < by_class["phone"] < by_class["pi"]
    assert hetero.offline(10_000, 0.2, rng).mean() == pytest.approx(0.2, abs=0.02)
    assert not hetero.offline(5, 0.0, rng).any()


def test_fixed_work_vs_partial_work():
    slow = hetero.Profile(steps_per_s=2.0, bandwidth_bps=1e6, compute_class="wearable")
    assert hetero.local_steps(20, slow, 5.0, partial_work=False) == 20      # runs all, arrives late
    assert hetero.local_steps(20, slow, 5.0, partial_work=True) == 10       # what fits in 5 s
    assert hetero.arrival_s(0, 20, 0, slow) == pytest.approx(10.0)
    assert hetero.transfer_s(1000, 8000.0) == pytest.approx(1.0)


def test_poisons():
    rng = np.random.default_rng(2)
    d = np.array([1.0, -2.0, 0.5], np.float32)
    assert np.array_equal(poison_delta(d, Poison("sign_flip", 0.1), rng), -d)
    assert np.allclose(poison_delta(d, Poison("scaling", 0.1, scale=10), rng), 10 * d)
    noise = poison_delta(np.zeros(10_000, np.float32), Poison("noise", 0.1, sigma=2.0), rng)
    assert noise.std() == pytest.approx(2.0, rel=0.05)
    assert np.array_equal(poison_delta(d, Poison("label_flip", 0.1), rng), d)
    assert np.array_equal(flip_labels(np.array([0, 1, 6]), 7), [6, 5, 0])
    assert len(malicious([f"d{i}" for i in range(40)], 0.3, rng)) == 12
    assert np.allclose(poison_delta(d, Poison("replacement", 0.1, boost=100), rng), -100 * d)
    unit = np.array([0.6, 0.0, -0.8], np.float32)   # targeted: the fixed direction at the honest delta's norm
    sent = poison_delta(d, Poison("targeted", 0.1, direction=unit), rng)
    assert np.allclose(sent, unit * np.linalg.norm(d)) and np.isclose(np.linalg.norm(sent), np.linalg.norm(d))
    with pytest.raises(ValueError, match="unit"):
        Poison("targeted", 0.1, direction=2 * unit)
    with pytest.raises(ValueError):
        Poison("bogus", 0.1)


def test_threshold_attack_separates_and_respects_ties():
    member, nonmember = np.array([0.1, 0.2, 0.3]), np.array([0.9, 1.0, 1.1])
    t = best_threshold(member, nonmember)
    assert threshold_accuracy(member, nonmember, t) == 1.0
    same = np.full(4, 0.5)    # indistinguishable: no threshold beats chance
    assert threshold_accuracy(same, same, best_threshold(same, same)) == 0.5


def test_attacks_reach_chance_on_identical_distributions_and_more_when_members_fit_better():
    rng = np.random.default_rng(3)

    def outputs(margin: float, n: int = 300) -> Outputs:
        y = rng.integers(0, 2, n)
        member = rng.normal(size=(n, 2))
        member[np.arange(n), y] += margin
        other = rng.normal(size=(n, 2))
        return Outputs(member, y, other, y)

    leaky = [outputs(2.0) for _ in range(3)]
    attack = loss_threshold_attack(leaky[0], leaky[1:])
    assert attack["loss_threshold"] > 0.6 and attack["oracle_threshold"] >= attack["loss_threshold"]
    assert shadow_attack(leaky[0], leaky[1:]) > 0.6
    tight = [outputs(0.0) for _ in range(3)]
    assert abs(loss_threshold_attack(tight[0], tight[1:])["loss_threshold"] - 0.5) < 0.08
    members, nonmembers = balance(100, 30, rng)
    assert len(members) == len(nonmembers) == 30 and len(set(members)) == 30


def test_calibration_hits_the_target_epsilon():
    def history(z):
        return [Entry(z, 0.1, 50)] * 5

    for target in (0.5, 1.0, 5.0):
        z = calibrate(target, history)
        assert epsilon(history(z), 1e-5) <= target < epsilon(history(z * 0.98), 1e-5)
    assert math.isinf(epsilon([Entry(0.0, 0.1, 1)], 1e-5))


@pytest.fixture(scope="module")
def heart16():
    from experiments.sim.harness import Scale, dataset

    return dataset("heart", Scale(split=2))      # 16 devices, 4 edges of 4


def test_small_federation_counts_real_messages_and_refuses_late_updates(heart16):
    from experiments.sim.harness import simulator

    sim = simulator(heart16, "fedavg", 0, rounds=2, lr=0.1, clip=1e6, hetero=hetero.HeteroConfig(cv=1.0))
    logs = sim.run()
    n, devices, edges = sim.n, len(heart16.clients), len(heart16.edges)
    for log in logs:
        assert log.participants + log.missed_deadline + log.declined + log.offline == devices
        # dense float32: every update and every model copy carries 4 bytes per parameter plus its envelope
        assert log.bytes_up >= 4 * n * (log.participants + log.missed_deadline)
        assert log.bytes_down >= 4 * n * (devices + edges)
        assert 0.0 <= log.accuracy <= 1.0 and log.wall_s > 0 and log.virtual_s > 0
    assert sum(log.missed_deadline for log in logs) > 0          # CV 1 + fixed work: stragglers miss the deadline
    assert sim.cloud.state.version == 3 and math.isinf(logs[-1].epsilon_device)   # no DP: unbounded epsilon
    # heart is binary: each round's AUROC / AUPRC / min(Se, +P) are of the interpreter's logits on the held-out set
    from sklearn.metrics import average_precision_score, precision_score, recall_score, roc_auc_score

    sim.model.set_flat(sim.cloud.state.server.weights)
    logits = sim.model.infer(heart16.x_test)
    margin, pred, y = logits[:, 1] - logits[:, 0], logits.argmax(1), heart16.y_test
    assert logs[-1].auroc == pytest.approx(roc_auc_score(y, margin))
    assert logs[-1].auprc == pytest.approx(average_precision_score(y, margin))
    assert logs[-1].min_se_ppv == pytest.approx(min(recall_score(y, pred), precision_score(y, pred, zero_division=0)))
    assert (logs[-1].loss, logs[-1].accuracy) == pytest.approx(sim.model.evaluate(heart16.x_test, y), rel=1e-4)


def test_filters_flag_noise_attackers(heart16):
    from experiments.sim.harness import simulator

    sim = simulator(heart16, "fediomt", 0, rounds=2, lr=0.1, clip=1e6, poison=Poison("noise", 0.25))
    logs = sim.run()
    bad = {d.id for d in sim.devices if d.malicious}
    assert len(bad) == 4
    assert all(log.filtered >= 2 for log in logs)
    assert min(sim.infos[d].quality for d in bad) < max(sim.infos[d].quality for d in sim.infos if d not in bad)


def test_tuned_settings_reach_the_simulated_method():
    """`accuracy --tuned`: a method runs with its tuning winner (lr, local epochs, strategy options on top of the
    method's own), and with the dataset recipe where tuning did not cover it; every method had the same budget."""
    from experiments.tune import BUDGET, SEARCH, tuned_run

    assert {len(configs) for configs in SEARCH.values()} == {BUDGET}
    won = {"watch/fediomt": {"lr": 0.2, "local_epochs": 2, "options": {"server_optimizer": "adam", "server_lr": 0.03}}}
    run = tuned_run(won, "watch", "fediomt", 0.5, 1)
    assert (run["lr"], run["local_epochs"]) == (0.2, 2)
    assert run["method"].options["server_optimizer"] == "adam" and run["method"].options["fednova"] is True
    assert tuned_run(won, "heart", "fediomt", 0.1, 1) == {"method": "fediomt", "lr": 0.1, "local_epochs": 1}


def test_communication_reuses_a_tuned_accuracy_run():
    """`experiment communication` reuses DIR/accuracy.json when it holds the same runs; --tuned is a Path on the
    command line and text in the JSON, and must still match (else the whole accuracy run is redone)."""
    from pathlib import Path

    from experiments.accuracy import same_runs

    stored = {"seeds": 3, "datasets": ["watch"], "rounds": 60, "tuned": "results/tune.json"}
    assert same_runs(stored, dict(stored, tuned=Path("results/tune.json")))
    assert not same_runs(stored, dict(stored, tuned=Path("results/other.json")))
    assert not same_runs(stored, dict(stored, rounds=40))


def test_devices_calibrate_their_noise_and_the_cloud_rederives_the_smallest_devices_exactly(heart16):
    """[privacy] calibrate through the tiers' own code (cloud plan_round, device.training.calibrated_plan, the
    cloud's ledger): each device adds the least noise that keeps it within the target over the run, so devices
    with more rows add less, every one spends ~the whole target (dp-accounting alone), and the cloud's derived
    history is the smallest device's own, entry for entry."""
    from experiments.sim.harness import simulator

    from .harness import dp_accounting_epsilon

    target, ceiling = 2.0, 8.0
    sim = simulator(heart16, "fedavg", 0, rounds=3, lr=0.1, clip=1.0, noise_mult=ceiling, device_epsilon=target)
    announced, train = [], sim._train

    def recording(dev, ann, *args):
        announced.append((ann.round_id, ann.plan.target_epsilon, ann.plan.target_delta, ann.plan.rounds_left))
        return train(dev, ann, *args)

    sim._train = recording
    logs = sim.run()
    assert len(logs) == 3
    assert sorted(set(announced)) == [(r, target, 1e-5, 4 - r) for r in (1, 2, 3)]   # the rounds left, this one in
    noise = {}
    for dev in sim.devices:
        assert len(dev.history) == 3
        spent = dp_accounting_epsilon([(e.noise_mult, e.sample_rate, e.steps) for e in dev.history], 1e-5, False)
        assert 0.99 * target <= spent <= target
        noise[len(dev.x)] = dev.history[-1].noise_mult
    sizes = sorted(noise)
    assert all(noise[a] > noise[b] for a, b in zip(sizes, sizes[1:])) and noise[sizes[-1]] < 0.7 * noise[sizes[0]]
    assert max(noise.values()) < ceiling
    smallest = next(d for d in sim.devices if len(d.x) == sizes[0])
    assert sim.cloud.state.ledger.device == list(smallest.history)
    assert 0.99 * target <= logs[-1].epsilon_device <= target
