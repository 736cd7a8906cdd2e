"""Device-side model tests: run by the main suite (ai-edge-litert 2.x, numpy 2) AND, by `./run test`, under
tflite-runtime 2.14 (numpy<2) and ai-edge-litert 1.x (what `fediomt[device]` installs), both without TensorFlow.
They load the committed prebuilt bundles."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from device.runtime import Int8Model, TrainableModel, interpreter_class
from firmware_models.devbundles import DEV_PUBKEY, DYNAMIC_RANGE, PREBUILT, STUDENT, TRAINABLE
from protocol.bundle import load_bundle
from protocol.errors import ProtocolError, Reason
from protocol.signing import load_public_key
from tests.runtime214.numpy_reference import check_dp_step, check_poisson_step, mlp_per_example_grads

pytestmark = pytest.mark.runtime214
RUNTIME = interpreter_class().__module__.split(".")[0]


def load(name: str, **kwargs) -> TrainableModel:
    bundle = load_bundle(PREBUILT / name, load_public_key(DEV_PUBKEY))
    return TrainableModel(bundle.model_bytes, bundle.manifest, **kwargs)


def learnable_data(model: TrainableModel, n: int, seed: int = 0):
    """Inputs whose class is a fixed linear function of the input: a few SGD steps must lower the loss."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *model.input_shape)).astype(np.float32)
    proj = np.random.default_rng(99).normal(size=(int(np.prod(model.input_shape)), model.n_classes))
    return x, np.argmax(x.reshape(n, -1) @ proj, axis=1).astype(np.int32)


@pytest.mark.parametrize("name", TRAINABLE)
def test_no_signature_input_is_rank_0(name):
    """A SignatureRunner call resizes every input to the value's shape; LiteRT 1.4.0's aarch64 wheel segfaults
    resizing to shape [] (docs/litert-aarch64-train-crash.md), so the bundles' hyperparameters are [1]."""
    bundle = load_bundle(PREBUILT / name, load_public_key(DEV_PUBKEY))
    interpreter = interpreter_class()(model_content=bundle.model_bytes)
    for signature in interpreter.get_signature_list():
        for key, detail in interpreter.get_signature_runner(signature).get_input_details().items():
            assert len(detail["shape"]) >= 1, (signature, key, detail["shape"])
    train = bundle.manifest["signatures"]["train"]["inputs"]
    assert all(train[k]["shape"] == [1] for k in ("lr", "clip", "noise_mult", "denom", "apply", "mu"))


def test_forced_runtime_is_used():
    forced = os.environ.get("FEDIOMT_RUNTIME")
    assert RUNTIME == (forced or "ai_edge_litert")


def test_device_code_never_imports_tensorflow():
    code = ("import sys, numpy as np; from device.runtime import TrainableModel; "
            "from protocol.bundle import load_bundle; from protocol.signing import load_public_key; "
            "from firmware_models.devbundles import PREBUILT, DEV_PUBKEY; "
            "b = load_bundle(PREBUILT / 'vitals_mlp', load_public_key(DEV_PUBKEY)); "
            "m = TrainableModel(b.model_bytes, b.manifest); "
            "m.train_step(np.zeros((32, 16), np.float32), np.zeros(32, np.int32), None, 0.1, 1.0, 1.0); "
            "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("name", TRAINABLE)
def test_prebuilt_bundle_trains_and_round_trips_weights(name):
    model = load(name)
    x, y = learnable_data(model, 256)
    before, _ = model.evaluate(x, y)
    rng = np.random.default_rng(1)
    for _ in range(30):
        idx = rng.choice(len(x), model.batch_size, replace=False)
        model.train_step(x[idx], y[idx], None, lr=0.1, clip=1e9, noise_mult=0.0)
    after, _ = model.evaluate(x, y)
    assert after < before
    flat = model.get_flat()
    assert flat.shape == (model.n_params,) and np.all(np.isfinite(flat))
    fresh = load(name)
    assert not np.allclose(fresh.get_flat(), flat)
    fresh.set_weights(model.get_weights())
    np.testing.assert_array_equal(fresh.infer(x[:45]), model.infer(x[:45]))


@pytest.mark.parametrize("name", ["har_mlp", "vitals_mlp"])
def test_dp_step_matches_numpy_reference(name):
    model = load(name)
    x, y = learnable_data(model, model.batch_size, seed=3)
    _, grads = mlp_per_example_grads(model.get_weights(), x, y)
    check_dp_step(model, x, y, grads, noise_mult=0.7, mu=0.3)


@pytest.mark.parametrize("name", ["har_mlp", "vitals_mlp"])
def test_poisson_step_masks_accumulates_and_divides_by_the_expected_batch(name):
    model = load(name)
    x, y = learnable_data(model, 2 * model.batch_size, seed=5)
    _, grads = mlp_per_example_grads(model.get_weights(), x, y)
    check_poisson_step(model, x, y, grads, noise_mult=0.9)


def test_set_weights_clears_a_split_steps_partial_sum():
    a, b = load("vitals_mlp"), load("vitals_mlp")
    x, y = learnable_data(a, a.batch_size, seed=6)
    a.train_step(x, y, None, 0.1, 1.0, 0.0, apply=False)   # accumulate, then abandon the round
    a.set_flat(b.get_flat())
    for m in (a, b):
        m.train_step(x, y, np.zeros(m.n_params, np.float32), 0.1, 1.0, 0.0)
    np.testing.assert_array_equal(a.get_flat(), b.get_flat())


def test_noise_none_draws_from_the_given_generator():
    a, b = load("vitals_mlp"), load("vitals_mlp")
    x, y = learnable_data(a, a.batch_size)
    a.train_step(x, y, None, 0.1, 1.0, 1.0, rng=np.random.default_rng(7))
    b.train_step(x, y, np.random.default_rng(7).standard_normal(b.noise_like(), dtype=np.float32), 0.1, 1.0, 1.0)
    np.testing.assert_array_equal(a.get_flat(), b.get_flat())
    c = load("vitals_mlp")
    c.train_step(x, y, None, 0.1, 1.0, 1.0)  # CSPRNG-seeded: differs from the fixed draw
    assert not np.array_equal(c.get_flat(), a.get_flat())


def test_bad_shapes_are_refused():
    model = load("vitals_mlp")
    with pytest.raises(ProtocolError) as err:
        model.train_step(np.zeros((31, 16), np.float32), np.zeros(31, np.int32), None, 0.1, 1.0, 1.0)
    assert err.value.reason == Reason.BAD_SHAPE
    with pytest.raises(ProtocolError) as err:
        model.set_flat(np.full(model.n_params, np.nan, np.float32))
    assert err.value.reason == Reason.NON_FINITE
    with pytest.raises(ProtocolError):
        model.set_flat(np.zeros(model.n_params + 1, np.float32))


def test_evaluate_pads_the_tail_batch():
    model = load("har_mlp")
    x, y = learnable_data(model, 45)
    logits = model.infer(x)
    assert logits.shape == (45, 6)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss, acc = model.evaluate(x, y)
    assert loss == pytest.approx(-np.mean(logp[np.arange(45), y]), rel=1e-5)
    assert acc == pytest.approx(np.mean(np.argmax(logits, axis=1) == y))


def test_int8_student_loads_and_agrees_with_fp32():
    bundle = load_bundle(PREBUILT / STUDENT, load_public_key(DEV_PUBKEY))
    assert bundle.manifest["kind"] == "int8_student"
    student = Int8Model(bundle.model_bytes)
    teacher = load("har_mlp")  # the student was quantised from the same initial weights
    x, _ = learnable_data(teacher, 100, seed=5)
    agree = np.mean(np.argmax(student.infer(x), axis=1) == np.argmax(teacher.infer(x), axis=1))
    assert agree >= 0.9


def test_dynamic_range_model_needs_a_newer_runtime():
    model_bytes = (PREBUILT / DYNAMIC_RANGE).read_bytes()
    if RUNTIME == "tflite_runtime":
        with pytest.raises((RuntimeError, ValueError), match="FULLY_CONNECTED"):
            interpreter_class()(model_content=model_bytes).allocate_tensors()
    else:
        interpreter_class()(model_content=model_bytes).allocate_tensors()


def test_int8_student_predicts_from_text_lines_without_tensorflow():
    """device/inference.py on the prebuilt int8 student: the windows a wearable reads, in this runtime."""
    from device.inference import Predictor, classify, parse_window

    bundle = load_bundle(PREBUILT / STUDENT, load_public_key(DEV_PUBKEY))
    predictor = Predictor(bundle)
    x = np.random.default_rng(0).normal(size=(5, *predictor.input_shape)).astype(np.float32)
    rows = np.stack([parse_window(",".join(f"{v:.6f}" for v in w.reshape(-1)), predictor.input_shape) for w in x])
    got = classify(predictor, rows)
    want = np.argmax(Int8Model(bundle.model_bytes).infer(rows), axis=1)
    assert [p.label for p in got] == list(want) and all(0 < p.confidence <= 1 for p in got)
    assert {(p.bundle, p.version) for p in got} == {(bundle.name, bundle.version)}
