"""Distributed DP under secure aggregation (protocol.secagg.deploy `MaskedRound.credit`, edge.secagg_round): in a
device-masked round that announces central DP while devices run DP-SGD, devices mask their noised delta (clipped to
the secagg clip BEFORE the last step's noise) on a range wide enough for the noise, and the edge credits the
survivors' noise, adding only the top-up. Real components throughout: the SecAgg cohort in process, the edge
engine, device.training."""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import pytest

from device.agent import user_clip
from device.training import train_round
from edge import central_dp
from protocol import signing
from protocol.distributed_dp import last_step_std, std_bounds
from protocol.messages import CentralDPReport, RoundAnnouncement, TrainingPlan, encode, sign_message
from protocol.secagg.deploy import EXTRAS, MIN_NOISE_STEPS, NOISE_RANGE_SIGMAS, MaskedRound, masked_round
from protocol.secagg.inprocess import run_cohort
from protocol.secagg.quant import levels, quantize

from .harness import DENSE, Fed, aggregate_of

TABLE = {"mode": "untrusted_edge", "graph": "full", "threshold": 0.3, "min_cohort": 3, "clip": 0.5, "bits": 16}
PLAN = TrainingPlan(lr=0.5, local_epochs=1, batch_size=32, clip=1.0, noise_mult=1.1)   # sigma = 0.0171875
SIGMA = 0.5 * 1.1 * 1.0 / 32


def announcement(plan: TrainingPlan = PLAN, central: CentralDPReport | None = CentralDPReport(1.0, 0.01, 0.5),
                 secagg: dict | None = None, **kw) -> RoundAnnouncement:
    return RoundAnnouncement(1, "m", 1, "fedavg", time.time() + 60, plan, DENSE.to_dict(), central_dp=central,
                             secagg=TABLE if secagg is None else secagg, **kw)


def noised_delta(rng: np.random.Generator, d: int, clip: float, sigma: float) -> np.ndarray:
    """What device.training returns with user_clip = clip: a noise-free delta of L2 norm `clip`, then N(0, sigma^2)."""
    x = rng.normal(size=d)
    return (x * (clip / np.linalg.norm(x)) + sigma * rng.standard_normal(d)).astype(np.float32)


def test_credit_only_with_central_dp_device_noise_a_training_round_and_noise_above_the_grid():
    masked = masked_round(announcement(lr_scale={"d00": 0.5, "d01": 2.0}))
    assert masked.credited and masked.noise_std == pytest.approx(2.0 * SIGMA)   # the largest lr_scale's sigma
    assert std_bounds(PLAN, {"d00": 0.5, "d01": 2.0}) == pytest.approx((0.5 * SIGMA, 2.0 * SIGMA))
    assert masked.config.clip == 0.5                                            # the sensitivity is unchanged
    assert masked.wire_config.clip == pytest.approx(0.5 + NOISE_RANGE_SIGMAS * 2.0 * SIGMA)
    assert masked.step() == pytest.approx(2 * masked.wire_config.clip / levels(16))
    assert user_clip(announcement(), masked) == 0.5                              # train to the secagg clip
    not_credited = [
        announcement(central=None),                                  # no central DP announced
        announcement(central=CentralDPReport(0.0, 1.0, 0.5)),        # central clip 0: no central DP
        announcement(plan=TrainingPlan(0.5, 1, 32, 1.0, 0.0)),       # no device noise
        announcement(secagg={**TABLE, "bits": 6}),                   # sigma < 4 grid steps: rounding would matter
        announcement(lr_scale={"d00": 0.001}),                       # one device's noise below the grid
        announcement(statistics="summary", features="{}"),          # statistics rounds are never credited
        announcement(plan=dataclasses.replace(PLAN, target_epsilon=5.0, target_delta=1e-5, rounds_left=3)),
        # ^ noise calibrated per device: no floor to credit
    ]
    for ann in not_credited:
        masked = masked_round(ann)
        assert masked == MaskedRound.from_announcement(ann.secagg) and not masked.credited
        assert masked.wire_config is masked.config
        assert user_clip(ann, masked) == 0.0                          # masked, not credited: as before
    assert masked_round(announcement(secagg={})) is None              # plaintext round
    assert user_clip(announcement(secagg={}), None) == 1.0            # the central clip (plaintext credit path)
    assert user_clip(announcement(secagg={}, central=None), None) == 0.0
    coarse = MaskedRound.from_announcement({**TABLE, "bits": 6}).credit(announcement())
    assert SIGMA < MIN_NOISE_STEPS * 2 * (0.5 + 10 * SIGMA) / levels(6) and not coarse.credited


def test_credited_device_vector_keeps_the_noise_on_a_range_that_covers_it_and_exact_counts():
    rng = np.random.default_rng(0)
    masked = masked_round(announcement())
    wire, d = masked.wire_config, 4000
    for trial in range(20):
        delta = noised_delta(rng, d, 0.5, SIGMA)
        vector = masked.device_vector(delta, 100 + trial, 7 + trial)
        assert vector.size == d + EXTRAS
        np.testing.assert_array_equal(vector[:-EXTRAS], delta)      # nothing clipped: not the L2 norm, no coordinate
        assert np.linalg.norm(vector[:-EXTRAS]) > 0.5 * 1.5          # the noise (norm ~ sqrt(d) sigma = 1.09) is kept
        assert np.abs(vector[:-EXTRAS]).max() < wire.clip            # the range covers it
        for seed in range(3):   # the counts quantize to exactly themselves on the wider grid
            q = quantize(vector[-EXTRAS:], wire.clip, wire.bits, np.random.default_rng(seed))
            assert q.tolist() == [100 + trial, 7 + trial]
    spike = np.zeros(d, np.float32)
    spike[:2] = [5.0, -5.0]                                         # beyond the range: still clipped to it
    assert masked.device_vector(spike, 1, 1)[:2].tolist() == pytest.approx([wire.clip, -wire.clip])


def test_uncredited_device_vector_is_unchanged():
    """The plain path (no central DP, or no device noise): L2 clip to `clip`, counts on the clip's grid."""
    rng = np.random.default_rng(1)
    delta = noised_delta(rng, 4000, 0.5, SIGMA)
    for masked in (MaskedRound.from_announcement(TABLE), masked_round(announcement(central=None)),
                   MaskedRound.from_announcement({**TABLE, "seed": 7, "density": 0.25})):
        vector = masked.device_vector(delta, 100, 7)
        norm = float(np.linalg.norm(delta.astype(np.float64)))
        want = (delta.astype(np.float64) * (0.5 / norm)).astype(np.float32)
        kept = want if masked.seed is None else want[np.isin(np.arange(4000), np.flatnonzero(
            masked.dense(np.ones(masked.coordinates(4000)), 4000)))]
        np.testing.assert_array_equal(vector[:-EXTRAS], kept)
        assert np.linalg.norm(vector[:-EXTRAS]) <= 0.5 + 1e-5
        assert quantize(vector[-EXTRAS:], 0.5, 16).tolist() == [100, 7]


def test_cohort_sum_of_credited_vectors_is_their_sum_within_the_grid_step():
    rng = np.random.default_rng(2)
    masked = masked_round(announcement(secagg={**TABLE, "seed": 11, "density": 0.5}))
    devices = [f"d{i}" for i in range(6)]
    keys = {dv: signing.generate_signing_key() for dv in devices}
    vectors = {dv: masked.device_vector(noised_delta(rng, 600, 0.5, SIGMA), 10 + i, 3) for i, dv in enumerate(devices)}
    result = run_cohort(vectors, keys, masked.wire_config, drop_after_shares={"d5"})
    total, samples, steps = masked.split(result)
    survivors = devices[:5]
    assert result.devices == survivors and samples == sum(10 + i for i in range(5)) and steps == 15
    want = np.sum([vectors[dv][:-EXTRAS] for dv in survivors], axis=0)
    assert np.abs(total - want).max() <= 5 * masked.step()          # each device's rounding: under one step
    assert np.abs(total / 5 - want / 5).max() <= 1.01 * masked.step()
    assert np.abs(total - want).max() > 0                           # (stochastic rounding happened)


def credited_round(fed: Fed, z: float, lr_scale: dict[str, float]):
    """Open a credited masked round on a fresh engine and close it with six devices' noised vectors (d05 drops)."""
    eng = fed.engine()
    assert eng.handle_cloud("model", fed.model())
    ann = announcement(central=CentralDPReport(1.0, z, 0.5), lr_scale=lr_scale)
    assert eng.handle_cloud("round", encode(sign_message(ann, fed.cloud_key)))
    masked = eng.masked
    assert masked == masked_round(ann) and masked.credited
    rng = np.random.default_rng(3)
    sigmas = {dv: last_step_std(PLAN, lr_scale.get(dv, 1.0)) for dv in fed.devices}
    vectors = {dv: masked.device_vector(noised_delta(rng, fed.n_params, 0.5, sigmas[dv]), 10, 3)
               for dv in fed.devices}
    result = run_cohort(vectors, fed.keys, masked.wire_config, edge_id="edge1", drop_after_shares={"d05"})
    agg, mean = aggregate_of(fed, eng.close_masked(1, result))
    survivors = fed.devices[:5]
    assert agg.device_ids == survivors and agg.weight_sum == 5.0 and agg.num_samples == 50
    credited = math.sqrt(sum(sigmas[dv] ** 2 for dv in survivors)) / 0.5   # sqrt(sum sigma_i^2) / clip
    return agg, mean, result, masked, credited


def test_engine_credits_the_survivors_noise_and_adds_none_when_it_covers_z(tmp_path, caplog):
    fed = Fed(tmp_path, n_devices=6, n_params=400)
    lr_scale = {"d00": 0.5, "d01": 2.0, "d05": 3.0}    # d05 drops: its noise is not in the sum, nor credited
    with caplog.at_level(logging.INFO, logger="edge"):
        agg, mean, result, masked, credited = credited_round(fed, 0.01, lr_scale)
    assert credited == pytest.approx(math.sqrt((0.25 + 4 + 3) * SIGMA**2) / 0.5)
    assert agg.credited_noise_mult == pytest.approx(credited)
    assert agg.central_dp.clip == 0.5 and agg.central_dp.noise_mult == pytest.approx(credited)   # the total
    assert credited > 0.01                                          # > the announced z: the edge adds nothing
    assert central_dp.top_up(0.01, 0.5, (credited * 0.5) ** 2) == 0.0
    total, _, _ = masked.split(result)
    np.testing.assert_array_equal(mean, masked.dense((total.astype(np.float64) / 5).astype(np.float32), 400))
    assert any(r.getMessage() == "distributed dp" for r in caplog.records)


def test_engine_adds_only_the_top_up_when_the_credit_falls_short_of_z(tmp_path):
    fed = Fed(tmp_path, n_devices=6, n_params=4000)
    z = 0.1   # the devices' credit (0.077) covers most of it: the top-up (0.064) is well below z
    agg, mean, result, masked, credited = credited_round(fed, z, {})
    assert credited == pytest.approx(math.sqrt(5) * SIGMA / 0.5) and credited < z
    assert agg.credited_noise_mult == pytest.approx(credited) and agg.central_dp.noise_mult == z   # total = z
    total, _, _ = masked.split(result)
    off = mean.astype(np.float64) - total / 5
    top_up = central_dp.top_up(z, 0.5, (credited * 0.5) ** 2)
    assert top_up == pytest.approx(math.sqrt(z**2 - credited**2)) and top_up < 0.7 * z
    assert 0.93 < off.std() / (top_up * 0.5 / 5) < 1.07            # std top_up * clip / survivors, not z * clip / 5


def test_device_trains_to_the_secagg_clip_and_masks_its_noise(tmp_path):
    """device.training with the agent's user_clip: the noise-free delta is clipped to the secagg clip before the
    last step's noise, and device_vector masks that noised delta as it is."""
    from device.runtime import TrainableModel
    from protocol.bundle import load_bundle

    from .harness import DEV_PUB, MODEL, PREBUILT, device_data

    bundle = load_bundle(PREBUILT / MODEL, signing.load_public_key(DEV_PUB))
    model = TrainableModel(bundle.model_bytes, bundle.manifest)
    weights = model.get_flat()
    plan = TrainingPlan(lr=0.5, local_epochs=1, batch_size=32, clip=1.0, noise_mult=1.1, max_steps=3)
    ann = announcement(plan=plan, secagg={**TABLE, "clip": 0.05})
    masked = masked_round(ann)
    assert masked.credited and user_clip(ann, masked) == 0.05
    x, y = device_data(64)
    sigma = last_step_std(plan)
    noisy = train_round(model, x, y, weights, plan, 3, np.random.default_rng(4), user_clip=user_clip(ann, masked))
    vector = masked.device_vector(noisy.delta, noisy.num_samples, noisy.local_steps)
    np.testing.assert_array_equal(vector[:-EXTRAS], noisy.delta)
    want = math.sqrt(0.05**2 + model.n_params * sigma**2)            # |clip_S(delta)| = S, plus the noise
    assert np.linalg.norm(vector[:-EXTRAS]) == pytest.approx(want, rel=0.1) and want > 2 * 0.05
