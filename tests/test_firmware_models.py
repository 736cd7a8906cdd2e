"""Firmware models in TensorFlow: the DP step against autodiff + NumPy, Keras twin, int8 students, QAT, builds."""

from __future__ import annotations

import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from device.runtime import Int8Model, TrainableModel  # noqa: E402
from fediomt.cli import main  # noqa: E402
from firmware_models import keras_model  # noqa: E402
from firmware_models.build import build_student_bundle, build_trainable  # noqa: E402
from firmware_models.cli import MODEL_NAMES  # noqa: E402
from firmware_models.devbundles import DEV_PUBKEY, PREBUILT, TRAINABLE  # noqa: E402
from firmware_models.models import MODELS, model_spec  # noqa: E402
from protocol.bundle import load_bundle  # noqa: E402
from protocol.signing import generate_signing_key, load_public_key  # noqa: E402
from protocol.weights import flatten  # noqa: E402
from tests.runtime214.numpy_reference import check_dp_step  # noqa: E402


@pytest.fixture(scope="module")
def built():
    """One conversion per model for the whole module (a conversion takes seconds)."""
    return {name: build_trainable(name) for name in TRAINABLE}


def runtime(built, name) -> TrainableModel:
    model_bytes, manifest = built[name]
    return TrainableModel(model_bytes, manifest)


def keras_per_example_grads(name, weights, x, y):
    """Per-example gradients by TF autodiff through the Keras twin (standard Conv1D/ReLU): independent of the
    hand-written backward pass in the firmware graph."""
    model = keras_model(name, weights)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    per_tensor = [[] for _ in weights]
    for b in range(len(x)):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[b:b + 1], model(x[b:b + 1]))
        for i, g in enumerate(tape.gradient(loss, model.trainable_weights)):
            per_tensor[i].append(g.numpy().astype(np.float64))
    return [np.stack(g) for g in per_tensor]


def data(model: TrainableModel, n: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, *model.input_shape)).astype(np.float32),
            rng.integers(0, model.n_classes, n).astype(np.int32))


def test_model_table_and_cli_choices_agree():
    assert tuple(MODELS) == MODEL_NAMES == TRAINABLE


@pytest.mark.parametrize("name", TRAINABLE)
def test_tflite_dp_step_matches_autodiff_and_numpy(built, name):
    """Per-example clipping, noise, FedProx and SCAFFOLD terms: TFLite vs autodiff + NumPy, to 1e-5."""
    model = runtime(built, name)
    x, y = data(model, model.batch_size, seed=1)
    grads = keras_per_example_grads(name, model.get_weights(), x, y)
    check_dp_step(model, x, y, grads, noise_mult=1.1, mu=0.2)


@pytest.mark.parametrize("name", TRAINABLE)
def test_no_noise_and_huge_clip_is_plain_sgd(built, name):
    model = runtime(built, name)
    x, y = data(model, model.batch_size, seed=4)
    weights = model.get_weights()
    twin = keras_model(name, weights)
    with tf.GradientTape() as tape:
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, twin(x))
    grads = tape.gradient(loss, twin.trainable_weights)
    noise = np.random.default_rng(0).standard_normal(model.n_params).astype(np.float32)  # multiplied by 0
    got_loss = model.train_step(x, y, noise, lr=0.5, clip=1e9, noise_mult=0.0)
    assert got_loss == pytest.approx(float(loss), rel=1e-5)
    want = [w - 0.5 * g.numpy() for w, g in zip(weights, grads)]
    np.testing.assert_allclose(model.get_flat(), flatten(want), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TRAINABLE)
def test_keras_twin_has_the_same_layout_and_forward(built, name):
    model = runtime(built, name)
    x, y = data(model, 40, seed=5)
    for _ in range(3):
        model.train_step(x[:32], y[:32], None, 0.1, 1.0, 0.5)
    twin = keras_model(name, model.get_weights())
    assert [tuple(w.shape) for w in twin.get_weights()] == [s.shape for s in model.layout]
    np.testing.assert_allclose(twin(x).numpy(), model.infer(x), atol=1e-4)


@pytest.mark.parametrize("name", TRAINABLE)
def test_graph_is_builtin_only_and_prebuilt_is_current(built, name):
    model_bytes, manifest = built[name]
    assert b"Flex" not in model_bytes
    prebuilt = load_bundle(PREBUILT / name, load_public_key(DEV_PUBKEY))
    for key in ("layout", "signatures", "batch_sizes", "input", "n_classes", "options"):
        assert prebuilt.manifest[key] == manifest[key], key
    if prebuilt.manifest["build"]["tensorflow"] == tf.__version__:  # the converter is deterministic per version
        assert prebuilt.model_bytes == model_bytes, "prebuilt bundles are stale: python -m firmware_models.devbundles"


def blobs(n_features: int, n: int, seed: int):
    """A nonlinear binary task (xor-like) that a small MLP learns well."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_features)).astype(np.float32)
    return x, ((x[:, 0] * x[:, 1] + 0.5 * x[:, 2]) > 0).astype(np.int32)


def test_qat_model_int8_export_loses_under_one_point(tmp_path):
    key = generate_signing_key()
    model_bytes, manifest = build_trainable("vitals_mlp", n_features=8, hidden=32, qat=True)
    assert manifest["options"]["qat"] is True
    model = TrainableModel(model_bytes, manifest)
    x, y = blobs(8, 4000, seed=0)
    xt, yt = blobs(8, 2000, seed=1)
    rng = np.random.default_rng(0)
    for _ in range(1500):
        idx = rng.choice(len(x), model.batch_size, replace=False)
        model.train_step(x[idx], y[idx], None, lr=0.1, clip=1e9, noise_mult=0.0)
    _, fp32_acc = model.evaluate(xt, yt)
    assert fp32_acc > 0.9
    path = build_student_bundle("vitals_mlp", tmp_path / "student", key, model.get_weights(), x[:300],
                                n_features=8, hidden=32, qat=True)
    student_bundle = load_bundle(path, key.public_key())
    student = Int8Model(student_bundle.model_bytes)
    int8_acc = np.mean(np.argmax(student.infer(xt), axis=1) == yt)
    assert fp32_acc - int8_acc < 0.01
    assert len(student_bundle.model_bytes) < len(model_bytes)
    assert student_bundle.manifest["signatures"]["serving_default"]["inputs"]["x"]["dtype"] == "int8"


def test_model_options_are_validated():
    assert model_spec("wearable_cnn", n_classes=5).n_classes == 5
    with pytest.raises(ValueError):
        model_spec("wearable_cnn", timesteps=101)
    with pytest.raises(KeyError):
        model_spec("resnet")


def test_models_cli_build_and_verify(tmp_path, capsys):
    out = tmp_path / "bundles"
    assert main(["models", "build", "--model", "vitals_mlp", "--out", str(out), "--version", "3",
                 "--option", "n_features=12"]) == 0
    pub = out / "signing.key.pub"
    manifest = json.loads((out / "vitals_mlp" / "manifest.json").read_text())
    assert manifest["version"] == 3 and manifest["input"]["shape"] == [12]
    assert main(["models", "verify", str(out / "vitals_mlp"), "--pubkey", str(pub)]) == 0
    assert main(["models", "list", str(out)]) == 0
    assert "vitals_mlp v3 trainable" in capsys.readouterr().out
    model = out / "vitals_mlp" / "model.tflite"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    assert main(["models", "verify", str(out / "vitals_mlp"), "--pubkey", str(pub)]) == 1
    assert "BAD_HASH" in capsys.readouterr().err


def test_train_step_bench_measures_without_tensorflow_on_the_device_side(tmp_path):
    from experiments.bench.train_step import measure
    from protocol.signing import save_public_key

    key = generate_signing_key()
    save_public_key(key.public_key(), tmp_path / "signing.pub")
    row = measure("vitals_mlp", steps=5, workdir=tmp_path, key=key)
    assert row["rss_process_imported_tf"] is False
    assert 0 < row["peak_rss_mb"] < 200
    assert row["litert_dp_step_ms"] > 0 and row["tf_function_dp_step_ms"] > 0
    assert row["int8_student_bytes"] < row["trainable_bytes"]
