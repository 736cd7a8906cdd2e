"""Device agent, functional core: config, privacy accountant, atomic state, local data, DP-SGD rounds."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import fields

import numpy as np
import pytest

from device.config import (
    CapabilityConfig,
    DeviceConfig,
    DeviceConnectionConfig,
    OtaConfig,
    PrivacyConfig,
    load_config,
)
from device.data import load_data
from device.runtime import TrainableModel
from device.state import DeviceState, load_state, save_state
from device.training import planned_steps, steps_within, train_round
from protocol import accountant
from protocol.accountant import Entry
from protocol.bundle import load_bundle
from protocol.messages import TrainingPlan
from protocol.signing import load_public_key

from .harness import PREBUILT, REPO, wait_for


@pytest.fixture(scope="module")
def cnn():
    bundle = load_bundle(PREBUILT / "wearable_cnn", load_public_key(PREBUILT / "DEVELOPMENT_ONLY_signing.key.pub"))
    return TrainableModel(bundle.model_bytes, bundle.manifest, rng=np.random.default_rng(0))


# ------------------------------------------------------------------ config
def test_example_config_documents_the_defaults():
    cfg = load_config(REPO / "configs" / "device.toml")
    for section, cls in ((cfg.broker, DeviceConnectionConfig), (cfg.capability, CapabilityConfig),
                         (cfg.privacy, PrivacyConfig), (cfg.ota, OtaConfig)):
        assert section == cls(), f"configs/device.toml disagrees with the {cls.__name__} defaults"
    for f in fields(DeviceConfig):
        if isinstance(f.default, (int, float, str)) or f.default is None:
            assert getattr(cfg, f.name) == f.default, f"configs/device.toml: {f.name} is not the default"
    assert cfg.id == "wrist-0001" and cfg.data.dir == REPO / "configs" / "data"
    assert cfg.state_dir == REPO / "configs" / "state"  # relative to the file


def test_config_refuses_unknown_keys_and_bad_values(tmp_path):
    base = 'id = "d1"\nedge = "e1"\nstate_dir = "s"\nbundle_dir = "b"\nbundle_pubkey = "p"\ncloud_pubkey = "c"\n' \
           'signing_key = "k"\n[data]\ndir = "d"\n'
    (tmp_path / "ok.toml").write_text(base + "[privacy]\nepsilon = 3\n")
    cfg = load_config(tmp_path / "ok.toml")
    assert cfg.privacy.epsilon == 3.0 and isinstance(cfg.privacy.epsilon, float)
    for extra, match in (("[broker]\nhots = 'x'\n", "unknown keys"), ("[privacy]\naccountant = 'gdp'\n", "accountant"),
                         ("[privacy]\nepsilon = inf\n", "finite"),
                         ("[capability]\ncompute_class = 'toaster'\n", "compute_class")):
        (tmp_path / "bad.toml").write_text(base + extra)
        with pytest.raises(ValueError, match=match):
            load_config(tmp_path / "bad.toml")
    (tmp_path / "bad.toml").write_text(base.replace('"d1"', '"d/1"'))
    with pytest.raises(ValueError):
        load_config(tmp_path / "bad.toml")


# ------------------------------------------------------------------ accountant
def test_accountant_matches_published_values_and_composes_history():
    # TF Privacy prints 1.712 for noise 1.1, q = 0.01, 1000 steps, delta 1e-5 (RDP)
    rdp = accountant.epsilon((Entry(1.1, 0.01, 1000),), 1e-5, "rdp")
    assert rdp == pytest.approx(1.7118, abs=1e-4)
    split = (Entry(1.1, 0.01, 400), Entry(1.1, 0.01, 600))
    assert accountant.epsilon(list(split), 1e-5, "rdp") == pytest.approx(rdp, rel=1e-9)
    pld = accountant.epsilon((Entry(1.1, 0.01, 1000),), 1e-5, "pld")
    assert 1.4 < pld < 1.712  # PLD is tighter
    assert accountant.epsilon((), 1e-5) == 0.0
    assert accountant.epsilon((Entry(0.0, 0.1, 1),), 1e-5) == math.inf


@pytest.mark.parametrize("noise_mult", [0.5, 1.1, 4.0])
@pytest.mark.parametrize("q", [1e-3, 0.05, 0.5, 1.0])
def test_ported_rdp_equals_dp_accounting(noise_mult, q):
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    history = (Entry(noise_mult, q, 250), Entry(noise_mult * 1.5, q / 2, 40))
    ref = rdp_privacy_accountant.RdpAccountant()  # its default order grid
    ref.compose(dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(
        e.sample_rate, dp_event.GaussianDpEvent(e.noise_mult)), e.steps) for e in history]))
    for delta in (1e-6, 1e-3):
        assert accountant.epsilon(history, delta, "rdp") == pytest.approx(ref.get_epsilon(delta), rel=1e-8)


def test_can_afford_refuses_the_round_that_would_exceed_the_budget():
    one = (Entry(1.1, 0.25, 4),)
    eps1 = accountant.epsilon(one, 1e-5)
    eps2 = accountant.epsilon(one * 2, 1e-5)
    budget = (eps1 + eps2) / 2
    assert accountant.can_afford((), one[0], budget, 1e-5)
    assert not accountant.can_afford(one, one[0], budget, 1e-5)
    assert accountant.can_afford(one, Entry(1.1, 0.25, 0), budget, 1e-5)  # nothing run, nothing spent


# ------------------------------------------------------------------ state
def test_state_round_trip(tmp_path):
    state = DeviceState(model_name="m", model_version=3, weights=np.arange(5, dtype=np.float32),
                        residual=np.ones(5, np.float32), history=(Entry(1.0, 0.1, 7),), seen_rounds=(1, 2),
                        steps_per_s=12.5, extra={"bundle_version": 2})
    save_state(tmp_path / "state.npz", state)
    back = load_state(tmp_path / "state.npz")
    assert back.model_version == 3 and back.history == state.history and back.seen_rounds == (1, 2)
    np.testing.assert_array_equal(back.weights, state.weights)
    assert back.control is None and back.extra == {"bundle_version": 2}
    assert oct(os.stat(tmp_path / "state.npz").st_mode & 0o777) == "0o600"
    assert load_state(tmp_path / "absent.npz") == DeviceState()


def test_state_survives_kill_9_at_any_moment(tmp_path):
    """A writer saves state k (every array = k, k history entries) in a loop; SIGKILL at random moments must
    always leave one whole state k behind."""
    path = tmp_path / "state.npz"
    writer = textwrap.dedent(f"""
        import numpy as np
        from protocol.accountant import Entry
        from device.state import DeviceState, save_state
        k = 0
        while True:
            k += 1
            v = np.full(20000, k, np.float32)
            save_state({str(path)!r}, DeviceState(model_version=k, weights=v, residual=v, control=v,
                       history=tuple(Entry(1.0, 0.1, k) for _ in range(k % 50)), seen_rounds=(k,)))
    """)
    rng = np.random.default_rng(1)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", writer], cwd=REPO)
        wait_for(path.exists, 20, 0.01, message="the writer's first state")
        time.sleep(float(rng.uniform(0.05, 0.3)))  # the kill lands at a random moment of the writes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_state(path)
        k = state.model_version
        assert k >= 1 and state.seen_rounds == (k,) and len(state.history) == k % 50
        for arr in (state.weights, state.residual, state.control):
            assert np.all(arr == k)
    assert not [p for p in tmp_path.iterdir() if p.name != "state.npz" and not p.name.endswith(".tmp")]


# ------------------------------------------------------------------ data
def test_load_data_npz_csv_and_entry_point(tmp_path, monkeypatch):
    from device.config import DataConfig

    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.savez(tmp_path / "train.npz", x=x, y=np.array([0, 1, 2, 1]))
    (tmp_path / "train.csv").write_text("a,b,label,c,d,e,f\n1,2,1,3,4,5,6\n")
    xs, ys = load_data(DataConfig(dir=tmp_path), (6,), 3)
    assert xs.shape == (5, 6) and ys.tolist() == [0, 1, 2, 1, 1]
    np.testing.assert_array_equal(xs[4], [1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="labels"):
        load_data(DataConfig(dir=tmp_path), (6,), 2)
    (tmp_path / "feed_mod.py").write_text("import numpy as np\ndef read():\n    return np.ones((3, 6)), [2, 2, 0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    xs, ys = load_data(DataConfig(entry_point="feed_mod:read"), (6,), 3)
    assert xs.shape == (3, 6) and ys.tolist() == [2, 2, 0]
    with pytest.raises(ValueError, match="module:function"):
        load_data(DataConfig(entry_point="nocolon"), (6,), 3)
    (tmp_path / "train.npz").unlink()
    (tmp_path / "train.csv").write_text("a,label\nnan,1\n")
    with pytest.raises(ValueError, match="NaN"):
        load_data(DataConfig(dir=tmp_path), (1,), 3)


# ------------------------------------------------------------------ training
def _plan(**kw) -> TrainingPlan:
    return TrainingPlan(**{"lr": 0.05, "local_epochs": 1, "batch_size": 32, "clip": 1.0, "noise_mult": 1.1, **kw})


def test_planned_and_adaptive_steps():
    assert planned_steps(_plan(local_epochs=2), 100, 32) == 8
    assert planned_steps(_plan(local_epochs=2, max_steps=3), 100, 32) == 3
    assert steps_within(8, 10.0, 0.0) == 8       # speed unknown: the plan
    assert steps_within(8, 1.5, 2.0) == 3        # a slow device does what fits
    assert steps_within(8, -1.0, 2.0) == 0


def test_train_round_delta_is_the_interpreters_weights(cnn):
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(1, 100, 6)).astype(np.float32), 64, axis=0)  # every batch is the same
    y = np.full(64, 3)
    start = cnn.get_flat()
    plan = _plan(noise_mult=0.0, clip=1e6)
    result = train_round(cnn, x, y, start, plan, 1, np.random.default_rng(1))
    # one Poisson step of k identical examples = k times the step of one of them over the expected batch 32
    cnn.set_flat(start)
    one = np.zeros(32, np.float32)
    one[0] = 1.0
    cnn.train_step(x[:32], y[:32], np.zeros(cnn.n_params, np.float32), 0.05, 1e6, 0.0, mask=one, denom=32.0)
    single = cnn.get_flat() - start
    k = float(result.delta @ single / (single @ single))
    assert abs(k - round(k)) < 1e-3 and 1 <= round(k) <= 64
    np.testing.assert_allclose(result.delta, round(k) * single, atol=1e-6)
    assert result.local_steps == 1 and result.sample_rate == 0.5 and result.num_samples == 64
    assert np.linalg.norm(result.delta) > 0


def test_train_round_noise_fedprox_scaffold_and_time_limit(cnn):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 100, 6)).astype(np.float32), rng.integers(0, 7, 64)
    start = cnn.get_flat()
    a = train_round(cnn, x, y, start, _plan(), 2, np.random.default_rng(1))
    b = train_round(cnn, x, y, start, _plan(), 2, np.random.default_rng(2))
    assert not np.allclose(a.delta, b.delta)  # different noise
    free = train_round(cnn, x, y, start, _plan(lr=0.5, noise_mult=0.0), 5, np.random.default_rng(3))
    prox = train_round(cnn, x, y, start, _plan(lr=0.5, noise_mult=0.0, mu=1.0), 5, np.random.default_rng(3))
    assert np.linalg.norm(prox.delta) < np.linalg.norm(free.delta)  # the proximal term pulls toward the global model
    c = np.full(cnn.n_params, 0.01, np.float32)
    sc = train_round(cnn, x, y, start, _plan(noise_mult=0.0, scaffold=True), 3, np.random.default_rng(4), c_global=c)
    np.testing.assert_allclose(sc.control_delta, -c - sc.delta / (3 * 0.05), rtol=1e-4, atol=1e-5)
    quick = train_round(cnn, x, y, start, _plan(), 10_000, np.random.default_rng(5), time_limit_s=0.2)
    assert 1 <= quick.local_steps < 10_000 and quick.elapsed_s < 2.0
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_round(cnn, x[:10], y[:10], start, _plan(), 1, np.random.default_rng(6))
