"""Issue 16: the device samples the way it accounts (Poisson), and every epsilon recomputes from the persisted history
with dp-accounting alone."""

from __future__ import annotations

import math

import numpy as np
import pytest

from device.training import chunks, poisson_sample, train_round
from device.update import RoundIdentity, build_update
from protocol.compression import CompressionSettings
from protocol.messages import Capability, TrainingPlan

from .harness import PREBUILT, dp_accounting_epsilon


class RecordingModel:
    """A stand-in for TrainableModel that records every `train` call (rows, mask, denominator, apply)."""

    def __init__(self, n_params: int = 5, batch_size: int = 8):
        self.n_params, self.batch_size = n_params, batch_size
        self.calls: list[tuple[np.ndarray, np.ndarray, float, bool]] = []
        self.w = np.zeros(n_params, np.float32)

    def set_flat(self, v):
        self.w = np.asarray(v, np.float32).copy()

    def get_flat(self):
        return self.w.copy()

    def train_step(self, x, y, noise, lr, clip, noise_mult, mu=0.0, ref_flat=None, control_flat=None, rng=None,
                   mask=None, denom=None, apply=True):
        assert len(x) == self.batch_size and mask.shape == (self.batch_size,)
        self.calls.append((np.asarray(x[:, 0], np.int64), mask.copy(), float(denom), bool(apply)))
        return 0.5


def _plan(**kw) -> TrainingPlan:
    return TrainingPlan(**{"lr": 0.1, "local_epochs": 1, "batch_size": 8, "clip": 1.0, "noise_mult": 1.0, **kw})


def _steps(calls):
    """Group recorded calls into steps: every step ends with exactly one apply=True call."""
    steps, current = [], []
    for call in calls:
        current.append(call)
        if call[3]:
            steps.append(current)
            current = []
    assert not current, "a step did not end with an applying call"
    return steps


def test_empirical_inclusion_rate_matches_q_over_many_steps():
    n, capacity, steps = 200, 8, 4000
    x = np.arange(n, dtype=np.float32).reshape(n, 1)   # each row carries its own index
    model = RecordingModel(batch_size=capacity)
    result = train_round(model, x, np.zeros(n, np.int64), np.zeros(5, np.float32), _plan(), steps,
                         np.random.default_rng(0))
    q = capacity / n
    assert result.sample_rate == q and result.local_steps == steps
    per_step = _steps(model.calls)
    assert len(per_step) == steps
    counts = np.zeros(n)
    sizes = []
    for step in per_step:
        rows = np.concatenate([r[m > 0] for r, m, _, _ in step])
        assert len(set(rows.tolist())) == len(rows)        # an example joins a step at most once
        counts[rows] += 1
        sizes.append(len(rows))
        assert all(d == capacity for _, _, d, _ in step)   # divided by the EXPECTED batch q * n, never by |batch|
    # every example's inclusion rate ~ q (binomial, 5 sigma), and the overall rate within 2 % of q
    sigma = math.sqrt(q * (1 - q) / steps)
    assert np.all(np.abs(counts / steps - q) < 5 * sigma)
    assert abs(counts.sum() / (steps * n) - q) < 0.02 * q
    # batch sizes vary like Binomial(n, q) (a fixed-size sampler would have variance 0)
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.1)
    assert max(sizes) > capacity    # overflows happened and were split, not truncated
    assert min(sizes) < capacity


def test_overflow_is_split_into_accumulating_chunks_and_empty_steps_add_noise_only():
    idx = np.arange(19)
    parts = chunks(idx, 8)
    assert [int(m.sum()) for _, m in parts] == [8, 8, 3]
    assert np.concatenate([r[m > 0] for r, m in parts]).tolist() == idx.tolist()
    (rows, mask), = chunks(np.array([], np.int64), 8)
    assert mask.sum() == 0 and rows.shape == (8,)
    assert poisson_sample(10, 0.0, np.random.default_rng(0)).size == 0
    assert poisson_sample(10, 1.0, np.random.default_rng(0)).tolist() == list(range(10))



@pytest.mark.parametrize("accountant_name", ["rdp", "pld"])
def test_reported_epsilon_recomputes_from_the_persisted_history(accountant_name):
    """The device's rounds (Poisson sampling in train_round, the history build_update persists) -> the epsilon it
    reports; dp-accounting alone, from the persisted [noise, rate, steps] lists, gives the same within 1 %."""
    rng = np.random.default_rng(1)
    history: tuple = ()
    settings = CompressionSettings(method="dense", bits=32)
    for round_id, (n, z, steps) in enumerate([(50, 1.1, 7), (50, 0.9, 3), (37, 1.3, 5)]):
        x = np.arange(n, dtype=np.float32).reshape(n, 1)
        result = train_round(RecordingModel(), x, np.zeros(n, np.int64), np.zeros(5, np.float32),
                             _plan(noise_mult=z), steps, rng)
        out = build_update(result, RoundIdentity("d", "e", round_id, round_id), settings, history=history,
                           residual=None, control=None, delta=1e-5, accountant_name=accountant_name,
                           capability=Capability("pi", 64, 1e6), n_params=5, rng=rng, nonce=bytes(16),
                           timestamp=1.0)
        history = out.history
        persisted = [e.to_list() for e in history]            # what device/state.py writes
        want = dp_accounting_epsilon(persisted, 1e-5, pld=accountant_name == "pld")
        assert out.update.privacy.epsilon == pytest.approx(want, rel=0.01)
        assert persisted[-1] == [z, 8 / n, steps]


def test_user_clip_bounds_the_noise_free_delta_and_adds_the_last_steps_noise():
    from device.runtime import TrainableModel
    from protocol.bundle import load_bundle
    from protocol.signing import load_public_key

    bundle = load_bundle(PREBUILT / "vitals_mlp", load_public_key(PREBUILT / "DEVELOPMENT_ONLY_signing.key.pub"))
    model = TrainableModel(bundle.model_bytes, bundle.manifest)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    start = model.get_flat()
    free = train_round(model, x, y, start, _plan(batch_size=32, lr=0.5, noise_mult=0.0), 5, np.random.default_rng(3),
                       user_clip=0.05)
    assert np.linalg.norm(free.delta) == pytest.approx(0.05, rel=1e-4)     # clipped, no noise
    plan = _plan(batch_size=32, lr=0.5, noise_mult=2.0)
    noisy = train_round(model, x, y, start, plan, 5, np.random.default_rng(4), user_clip=0.05)
    std = 0.5 * 2.0 * 1.0 / 32                                        # lr * z * C / b: the last step's noise
    want = math.sqrt(0.05**2 + model.n_params * std**2)
    assert np.linalg.norm(noisy.delta) == pytest.approx(want, rel=0.15)
    assert noisy.sample_rate == 32 / 200 and noisy.local_steps == 5


def test_distributed_dp_tops_up_only_what_the_devices_noise_misses():
    from edge import central_dp
    from edge.aggregate import FilterConfig, Meta, aggregate
    from edge.rows import Rows
    from edge.weighting import WeightingConfig
    from protocol.distributed_dp import last_step_std

    plan = _plan(lr=0.5, noise_mult=2.0, batch_size=32)
    sigma = last_step_std(plan)
    assert sigma == pytest.approx(0.5 * 2.0 * 1.0 / 32)
    # W devices' independent noise sums to sqrt(W) sigma: the edge adds only the rest of z * S
    assert central_dp.top_up(1.0, 1.0, 100 * sigma**2) == pytest.approx(math.sqrt(1.0 - 100 * sigma**2))
    assert central_dp.top_up(0.1, 0.1, 1000 * sigma**2) == 0.0
    n, d = 100, 6
    rng = np.random.default_rng(0)
    deltas = rng.normal(0, 0.05, (n, d)).astype(np.float32)
    rows = Rows.stack(d, [(None, row) for row in deltas])
    meta = Meta(num_samples=np.full(n, 10.0), losses=np.zeros(n), classes=["pi"] * n, staleness=np.ones(n),
                sample_weight=np.ones(n))
    noise = rng.standard_normal(d)
    credited = np.full(n, sigma)
    got = aggregate(rows, meta, WeightingConfig(), FilterConfig(enabled=[]), clip=1.0, noise_mult=1.0,
                    noise=noise, credited=credited)
    top = central_dp.top_up(1.0, 1.0, n * sigma**2)
    assert 0 < top < 1
    np.testing.assert_allclose(got.mean, (deltas.sum(0) + top * noise) / n, rtol=1e-5, atol=1e-7)
    assert got.credited_var == pytest.approx(n * sigma**2) and got.num_clipped == 0


def test_the_expected_batch_is_the_plans_whatever_the_models_capacity():
    """Device, cloud and edge use one b: the announced plan.batch_size (q = b / n, the divisor b), while the model's
    capacity only sizes the calls; a b above the capacity splits every step, and the cloud's derived event is the
    device's own."""
    from cloud.accounting import device_event
    from device.training import planned_steps

    n, plan = 64, _plan(batch_size=16)
    model = RecordingModel(batch_size=8)
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    steps = planned_steps(plan, n, plan.batch_size)
    result = train_round(model, x, np.zeros(n, np.int64), np.zeros(5, np.float32), plan, steps,
                         np.random.default_rng(0))
    assert result.sample_rate == 16 / n and result.local_steps == steps == 4
    assert {denom for _, _, denom, _ in model.calls} == {16.0}
    assert len(model.calls) >= 2 * steps    # k ~ Binomial(64, 1/4): at least two calls of 8 per step, mostly
    assert device_event(plan, n) == accountant_entry(result)


def accountant_entry(result):
    from protocol.accountant import Entry

    return Entry(result.noise_mult, result.sample_rate, result.local_steps)


def test_calibrate_finds_the_least_noise_within_the_ceiling():
    """protocol.accountant.calibrate: the noise it returns keeps history + rounds within the target (on the full
    order grid and for dp-accounting), 0.5 % less would not (on its integer orders); a lower sample rate needs less
    noise; the ceiling caps it, and a target even the ceiling cannot keep returns the ceiling (can_afford decides)."""
    from protocol.accountant import INT_ORDERS, Entry, _rdp_int, calibrate, epsilon, rdp_to_epsilon

    history = (Entry(3.0, 0.5, 2),) * 10
    for q, steps in ((0.5, 2), (0.25, 4), (0.1, 10)):
        z = calibrate(history, q, steps, 30, 8.0, 1e-5, 10.0)
        total = (*history, Entry(z, q, steps * 30))
        assert epsilon(total, 1e-5) <= 8.0
        assert dp_accounting_epsilon([(e.noise_mult, e.sample_rate, e.steps) for e in total], 1e-5, False) <= 8.0
        tighter = _rdp_int((*history, Entry(0.995 * z, q, steps * 30)))
        assert rdp_to_epsilon(tighter, 1e-5, INT_ORDERS) > 8.0
    low, high = calibrate((), 0.1, 10, 30, 8.0, 1e-5, 10.0), calibrate((), 0.5, 2, 30, 8.0, 1e-5, 10.0)
    assert low < high < 10.0
    assert calibrate((), 0.5, 2, 30, 8.0, 1e-5, 0.5 * high) == 0.5 * high   # more than the ceiling: the ceiling
    assert calibrate((), 0.5, 2, 1, 1e4, 1e-5, 10.0) == 0.1                  # a loose target: the search's floor
    # the value recurs round after round (4 significant digits, rounded up): one RDP curve for the accountant
    h = (Entry(high, 0.5, 2),)
    assert calibrate(h, 0.5, 2, 29, 8.0, 1e-5, 10.0) == high


def test_a_device_holds_both_its_budget_and_the_announced_target_at_the_smaller_delta():
    """device.training.privacy_limit / calibrated_plan: a device whose own delta is larger than the cloud's
    calibrates at the cloud's, so the cloud's (target, delta) claim holds for it too; a smaller own budget wins."""
    import dataclasses

    from cloud.accounting import device_event
    from device.training import calibrated_plan, privacy_limit
    from protocol.accountant import epsilon

    plan = dataclasses.replace(_plan(batch_size=128, noise_mult=6.0), target_epsilon=10.0, target_delta=1e-5,
                               rounds_left=80)
    assert privacy_limit(plan, 20.0, 1e-4) == (10.0, 1e-5)
    assert privacy_limit(plan, 3.0, 1e-6) == (3.0, 1e-6)
    assert privacy_limit(_plan(), 3.0, 1e-4) == (3.0, 1e-4)                 # no target: the device's own
    loose = calibrated_plan(plan, (), 400, *privacy_limit(plan, 20.0, 1e-4))
    assert loose == dataclasses.replace(plan, noise_mult=device_event(plan, 400).noise_mult)   # the cloud's own
    entry = device_event(plan, 400)
    assert epsilon([dataclasses.replace(entry, steps=entry.steps * 80)], 1e-5) <= 10.0
    strict = calibrated_plan(plan, (), 400, *privacy_limit(plan, 3.0, 1e-6))
    assert loose.noise_mult < strict.noise_mult <= 6.0
    with pytest.raises(ValueError, match="target_epsilon needs rounds_left"):
        dataclasses.replace(plan, rounds_left=0)


def test_calibrated_rounds_credit_no_device_noise(tmp_path):
    """A plan whose devices calibrate their noise has no noise floor (protocol.distributed_dp.creditable): the edge
    takes its normal path, clipping each update and adding the full central noise, with nothing credited."""
    import dataclasses

    from protocol.distributed_dp import creditable
    from protocol.messages import CentralDPReport

    from .harness import Fed, open_round

    plan = _plan(noise_mult=2.0)
    calibrated = dataclasses.replace(plan, target_epsilon=5.0, target_delta=1e-5, rounds_left=10)
    assert creditable(plan) and not creditable(calibrated) and not creditable(_plan(noise_mult=0.0))
    fed = Fed(tmp_path, n_devices=2)
    eng = fed.engine()
    central = CentralDPReport(clip=0.5, noise_mult=1.0, sampling_rate=1.0)
    open_round(fed, eng, central_dp=central)
    ann = dataclasses.replace(eng.announcement, plan=calibrated)
    assert eng._credited(dataclasses.replace(ann, plan=plan), fed.devices, np.ones(2), 2) is not None
    assert eng._credited(ann, fed.devices, np.ones(2), 2) is None
