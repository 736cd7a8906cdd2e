"""Distillation to int8 students: the smartwatch teacher -> a wearable student (size, agreement, bundle), the
data-free path (teacher inversion), and the size budget."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("seglearn")

from cloud.distill import (  # noqa: E402
    DistillConfig,
    StudentTarget,
    default_targets,
    distill_round,
    synthetic_inputs,
)
from device.runtime import Int8Model  # noqa: E402
from protocol.bundle import load_bundle  # noqa: E402
from protocol.signing import generate_signing_key  # noqa: E402

TEACHER = {"n_classes": 7, "filters": 32}


@pytest.fixture(scope="module")
def watch():
    from experiments.datasets import load

    return load("watch")


@pytest.fixture(scope="module")
def teacher(watch):
    """A quickly trained smartwatch teacher (stand-in for the federation's global model)."""
    import keras

    from firmware_models import keras_model

    keras.utils.set_random_seed(0)
    x, y = watch.pooled()
    model = keras_model("wearable_cnn", **TEACHER)
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=3, batch_size=64, verbose=0)
    return [np.asarray(w) for w in model.get_weights()]


def test_wearable_student_is_small_and_agrees_with_the_teacher(tmp_path, watch, teacher):
    key = generate_signing_key()
    x, _ = watch.pooled()  # transfer set: unlabeled windows
    [report] = distill_round("wearable_cnn", teacher, TEACHER, key, tmp_path, version=7, proxy_x=x,
                             eval_x=watch.x_test, eval_y=watch.y_test,
                             targets=[StudentTarget("wearable", "wearable_cnn", {"n_classes": 7, "filters": 16},
                                                    32 * 1024)],
                             cfg=DistillConfig(steps=350))
    print(f"teacher {report.teacher_bytes} B acc {report.teacher_accuracy:.3f}; int8 student {report.student_bytes} B "
          f"acc {report.student_accuracy:.3f}, agreement {report.agreement:.3f}")
    assert report.student_bytes <= 32 * 1024
    assert report.student_bytes * 4 <= report.teacher_bytes
    assert report.agreement >= 0.88  # measured 0.93 with these settings (bench, 2500 steps: 0.98)
    assert report.student_accuracy >= report.teacher_accuracy - 0.1
    bundle = load_bundle(report.bundle, key.public_key())
    assert bundle.manifest["kind"] == "int8_student" and bundle.manifest["device_class"] == "wearable"
    assert bundle.version == 7 and bundle.manifest["options"]["filters"] == 16
    logits = Int8Model(bundle.model_bytes).infer(watch.x_test[:5])
    assert logits.shape == (5, 7) and np.all(np.isfinite(logits))


def test_a_student_of_the_teachers_own_architecture_is_its_quantised_weights_when_they_agree_better(tmp_path, watch,
                                                                                                   teacher):
    """The Pi student has the teacher's architecture: a few distillation steps cannot match the teacher's own
    weights at int8, so the quantised teacher is chosen (on the transfer rows, never the evaluation rows) and
    agrees with the teacher on >= 0.97 of the held-out windows; a smaller student has no such candidate."""
    x, _ = watch.pooled()
    pi = StudentTarget("pi", "wearable_cnn", {**TEACHER, "kernel": 5}, 64 * 1024)   # the default kernel, spelt out
    small = StudentTarget("wearable", "wearable_cnn", {"n_classes": 7, "filters": 16}, 32 * 1024)
    reports = distill_round("wearable_cnn", teacher, TEACHER, generate_signing_key(), tmp_path, version=1,
                            proxy_x=x, eval_x=watch.x_test, eval_y=watch.y_test, targets=[pi, small],
                            cfg=DistillConfig(steps=20))
    by = {r.device_class: r for r in reports}
    assert by["pi"].method == "quantised teacher" and by["pi"].agreement >= 0.97
    assert by["pi"].student_accuracy >= 0.97 * by["pi"].teacher_accuracy
    assert by["wearable"].method == "distilled"


def test_student_over_its_budget_is_reported_but_not_bundled(tmp_path, watch, teacher):
    [report] = distill_round("wearable_cnn", teacher, TEACHER, generate_signing_key(), tmp_path, version=1,
                             proxy_x=watch.x_test[:256],
                             targets=[StudentTarget("wearable", "wearable_cnn", {"n_classes": 7, "filters": 4}, 2048)],
                             cfg=DistillConfig(steps=4))
    assert report.bundle is None and report.student_bytes > 2048
    assert not (tmp_path / "wearable").exists()
    assert report.student_accuracy is None  # held-back transfer rows have no labels


def test_teacher_inversion_makes_rows_the_teacher_labels_as_asked():
    """Data-free transfer set: balanced over classes, and the teacher agrees with the class each row was made for."""
    from firmware_models import keras_model, model_spec

    spec = model_spec("vitals_mlp", n_features=8)
    teacher = keras_model("vitals_mlp", spec.init_weights(3), n_features=8)
    rows = synthetic_inputs(teacher, spec.input_shape, spec.n_classes, DistillConfig(synthetic_rows=64,
                                                                                     synthetic_steps=100))
    assert rows.shape == (64, 8) and np.all(np.isfinite(rows))
    predicted = np.argmax(np.asarray(teacher(rows)), axis=1)
    assert np.mean(predicted == np.arange(64) % 2) >= 0.9


def test_default_targets_shrink_the_teacher_family():
    targets = {t.device_class: t for t in default_targets("wearable_cnn", {"n_classes": 7, "filters": 64})}
    assert targets["wearable"].options["filters"] < targets["pi"].options["filters"] < 64
    assert targets["wearable"].max_bytes == 32 * 1024
    assert default_targets("har_mlp", {})[0].options["hidden"] == 16
    with pytest.raises(ValueError):
        default_targets("unknown", {})


def test_bench_distill_quick_reports_its_figures(tmp_path, capsys):
    import argparse

    from experiments.bench.distill import run

    figures = run(argparse.Namespace(quick=True, out=tmp_path))
    for key in ("teacher_bytes", "student_bytes", "teacher_accuracy", "student_accuracy", "agreement",
                "int8_infer_us", "push_s_5_devices"):
        assert figures[key] > 0, key
    assert figures["student_bytes"] * 8 <= figures["teacher_bytes"]
    assert figures["push_bundle_bytes"] > figures["student_bytes"]
    assert "agreement" in capsys.readouterr().out


def test_proxy_file_and_schedule(tmp_path):
    from cloud.distill import load_proxy

    np.savez(tmp_path / "p.npz", x=np.ones((4, 3), np.float32))
    x, y = load_proxy(tmp_path / "p.npz")
    assert x.shape == (4, 3) and y is None
    np.savez(tmp_path / "bad.npz", x=np.ones((4, 3)), y=np.zeros(3))
    with pytest.raises(ValueError):
        load_proxy(tmp_path / "bad.npz")
    cfg = DistillConfig(every_rounds=5)
    assert [r for r in range(12) if cfg.due(r)] == [5, 10]
