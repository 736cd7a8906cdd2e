"""Knowledge distillation of the global model (teacher) into small full-int8 students, one per device class.

Heterogeneous fleets: capable devices (Pis) train the teacher architecture in the federation; wearables only run a
student of the same family with smaller options (fewer filters / hidden units). The cloud keeps the teacher (the
global model) and the students' float weights, and every N rounds calls `distill_round`, which for each class:
distils on transfer data, converts to full-int8 TFLite (int8 in/out, calibrated on transfer rows), measures the
int8 model's top-1 agreement with the teacher (and accuracy when labels exist) in LiteRT, and writes a signed
bundle (firmware_models bundle format) ready for `cloud.push.push_bundle`.

Loss, per batch: alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(y, s) when the transfer set
has labels, else the KL term alone (t: teacher logits, s: student logits, T: temperature). The teacher labels each
batch as it is drawn, after augmentation (mixup of two rows + small noise and per-feature scaling: "function
matching"), so the student learns the teacher's function around the data, not just its answers on it.

Transfer data (the cloud never sees device data):
- a public / proxy unlabeled set (configurable: an NPZ with `x`, optional `y`), e.g. consented or open recordings
  of the same sensor; best agreement on real inputs;
- otherwise synthetic inputs by teacher inversion (data-free): smooth noise optimised so that the teacher assigns
  each row confidently to a chosen class (balanced), with an L2 and (for time series) a smoothness prior. No data
  needed, but the rows only resemble what the teacher responds to, so agreement on real inputs is lower (measured
  by `fediomt bench distill`: docs/distillation.md).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.weights import unflatten

WEARABLE_MAX_BYTES = 32 * 1024


@dataclass(frozen=True)
class StudentTarget:
    """One device class's student: a firmware model of the teacher's family with smaller options."""

    device_class: str           # the OTA class its bundle is pushed to ("wearable", "pi")
    model: str                  # firmware model name (firmware_models.MODELS)
    options: dict               # build options, e.g. {"n_classes": 7, "filters": 8}
    max_bytes: int              # int8 TFLite budget; a student over it is reported, and not bundled


@dataclass(frozen=True)
class DistillConfig:
    """How the cloud distils int8 students (temperature, steps, augmentation, synthetic rows) and how often."""

    temperature: float = 4.0
    alpha: float = 0.7          # weight of the soft term when the transfer set has labels (else 1)
    steps: int = 2500           # optimizer steps, whatever the transfer set's size: a small set is cycled more
    batch_size: int = 64
    lr: float = 1e-2
    cosine: bool = True         # cosine decay of the learning rate to 0 over the steps
    mixup: bool = True          # teacher labels mixed rows too (function matching)
    noise: float = 0.05         # augmentation: gaussian noise (x std of each feature) ...
    scale: float = 0.1          # ... and per-feature scaling in [1 - scale, 1 + scale]
    synthetic_rows: int = 2048  # rows made by teacher inversion when there is no proxy set
    synthetic_steps: int = 200
    calibration_rows: int = 200
    seed: int = 0
    every_rounds: int = 10      # the cloud distils (and pushes) after every N-th round
    min_agreement: float = 0.0  # quality gate: int8 top-1 agreement with the teacher on held-out rows ...
    min_accuracy_ratio: float = 0.0  # ... and student accuracy >= this x the teacher's (when labels exist)

    def due(self, round_id: int) -> bool:
        return self.every_rounds > 0 and round_id > 0 and round_id % self.every_rounds == 0


@dataclass(frozen=True)
class StudentReport:
    """One distilled student's outcome: sizes, agreement with the teacher, accuracies, bundle (None: over budget)."""

    device_class: str
    name: str
    options: dict
    version: int
    bundle: Path | None         # None when the student is over its budget
    student_bytes: int          # int8 TFLite
    teacher_bytes: int          # the teacher as an fp32 inference TFLite
    agreement: float            # top-1 agreement of the int8 student with the teacher on the evaluation rows
    student_accuracy: float | None
    teacher_accuracy: float | None
    float_agreement: float      # the float student before quantisation
    seconds: float
    weights: list[np.ndarray] = field(repr=False, default_factory=list)  # float student, kept for warm starts
    bundle_name: str = ""       # the student's bundle name (student_name(teacher, class)), versions of its own
    refused: str = ""           # why the quality gate (or the size budget) refused it: never pushed; "" = passed
    eval_rows: int = 0
    method: str = "distilled"   # or "quantised teacher": a student of the teacher's own architecture whose int8
                                # PTQ of the teacher's weights agreed better on the transfer rows


def student_name(teacher: str, device_class: str) -> str:
    """A student's bundle name: its own version sequence, never compared with the teacher's trainable bundle (a
    device on `models build --version 6` is not offered a "downgrade")."""
    return f"{teacher}-{device_class}-student"


def gate(r: StudentReport, min_agreement: float, min_accuracy_ratio: float) -> str:
    """"" when the student may be pushed, else why not (the thresholds of cloud.toml [distill])."""
    if r.agreement < min_agreement:
        return f"agreement {r.agreement:.3f} < {min_agreement:.3f} on {r.eval_rows} held-out rows"
    if (min_accuracy_ratio > 0 and r.student_accuracy is not None and r.teacher_accuracy
            and r.student_accuracy < min_accuracy_ratio * r.teacher_accuracy):
        return (f"accuracy {r.student_accuracy:.3f} < {min_accuracy_ratio:.2f} x teacher {r.teacher_accuracy:.3f} "
                f"on {r.eval_rows} held-out rows")
    return ""


def default_targets(teacher: str, options: dict) -> list[StudentTarget]:
    """A wearable student (<= 32 KB int8) and a Pi student of the teacher's family: the teacher's width, capped at
    16 / 32 filters (wearable_cnn; 16 filters = ~12 KB int8) or 16 / 32 hidden units (MLPs). A teacher that
    already fits is "distilled" into its own architecture at int8 (what the wearable can run: it cannot train)."""
    opts = dict(options)
    if teacher == "wearable_cnn":
        f = int(opts.get("filters", 16))
        return [StudentTarget("wearable", teacher, {**opts, "filters": max(4, min(f, 16))}, WEARABLE_MAX_BYTES),
                StudentTarget("pi", teacher, {**opts, "filters": max(8, min(f, 32))}, 256 * 1024)]
    if teacher in ("har_mlp", "vitals_mlp"):
        h = int(opts.get("hidden", 64 if teacher == "har_mlp" else 16))
        return [StudentTarget("wearable", teacher, {**opts, "hidden": max(4, min(h, 16))}, WEARABLE_MAX_BYTES),
                StudentTarget("pi", teacher, {**opts, "hidden": max(8, min(h, 32))}, 256 * 1024)]
    raise ValueError(f"no default students for {teacher!r}")


def load_proxy(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """A transfer set from an NPZ: `x` (float32, (n, *input_shape)) and optionally `y` (integer labels)."""
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data:
            raise ValueError(f"{path}: a proxy NPZ needs an array 'x'")
        x = np.asarray(data["x"], np.float32)
        y = np.asarray(data["y"]).astype(np.int64) if "y" in data else None
    if len(x) == 0 or (y is not None and len(y) != len(x)):
        raise ValueError(f"{path}: {len(x)} rows in x, {None if y is None else len(y)} labels")
    return x, y


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 agreement of two logit arrays."""
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))


def predict(model, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    return np.concatenate([np.asarray(model(x[i:i + batch], training=False)) for i in range(0, len(x), batch)])


def float_tflite(name: str, weights: list[np.ndarray], **options) -> bytes:
    """The fp32 inference-only TFLite of a model (the fair size to compare an int8 student with)."""
    import tensorflow as tf

    from firmware_models.models import forward, model_spec

    spec = model_spec(name, **options)
    consts = [tf.constant(np.asarray(w, np.float32)) for w in weights]

    @tf.function(input_signature=[tf.TensorSpec([None, *spec.input_shape], tf.float32, name="x")])
    def infer(x):
        return {"logits": forward(spec, consts, x)[0]}

    holder = tf.Module()
    holder.infer = infer
    return tf.lite.TFLiteConverter.from_concrete_functions([infer.get_concrete_function()], holder).convert()


def synthetic_inputs(teacher, input_shape: tuple[int, ...], n_classes: int, cfg: DistillConfig) -> np.ndarray:
    """Teacher inversion: rows the teacher classifies confidently, balanced over classes, with smoothness and L2
    priors (data-free distillation when the cloud has no proxy set)."""
    import tensorflow as tf

    rng = np.random.default_rng(cfg.seed)
    n = cfg.synthetic_rows
    start = rng.normal(size=(n, *input_shape)).astype(np.float32)
    if len(input_shape) == 2:  # time series: start from a random walk low-passed along time
        start = np.cumsum(start, axis=1) / np.sqrt(np.arange(1, input_shape[0] + 1))[None, :, None]
    x = tf.Variable(start.astype(np.float32))
    target = tf.constant(np.arange(n) % n_classes)
    opt = tf.keras.optimizers.Adam(0.05)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = teacher(x, training=False)
            ce = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(target, logits, from_logits=True))
            prior = 1e-3 * tf.reduce_mean(tf.square(x))
            if len(input_shape) == 2:
                prior += 1e-2 * tf.reduce_mean(tf.square(x[:, 1:] - x[:, :-1]))
            loss = ce + prior
        opt.apply_gradients([(tape.gradient(loss, x), x)])
        return loss

    for _ in range(cfg.synthetic_steps):
        step()
    return x.numpy()


def _augment(x: np.ndarray, rng: np.random.Generator, cfg: DistillConfig, std: np.ndarray) -> np.ndarray:
    if cfg.mixup:
        lam = rng.beta(0.4, 0.4, size=(len(x),) + (1,) * (x.ndim - 1)).astype(np.float32)
        x = lam * x + (1 - lam) * x[rng.permutation(len(x))]
    feature_axes = x.shape[-1:]
    x = x * rng.uniform(1 - cfg.scale, 1 + cfg.scale, size=(len(x), *([1] * (x.ndim - 2)), *feature_axes))
    return (x + cfg.noise * std * rng.standard_normal(x.shape)).astype(np.float32)


def distil(teacher, target: StudentTarget, x: np.ndarray, y: np.ndarray | None, cfg: DistillConfig,
           init: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Train the float student of `target` on transfer rows `x` (labels `y` optional); returns its weights."""
    import keras
    import tensorflow as tf

    from firmware_models import keras_model, model_spec

    spec = model_spec(target.model, **target.options)
    student = keras_model(target.model, init or spec.init_weights(cfg.seed), **target.options)
    opt = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(cfg.lr, cfg.steps) if cfg.cosine else cfg.lr)
    temp = float(cfg.temperature)
    alpha = cfg.alpha if y is not None else 1.0

    @tf.function
    def step(xb, yb, hard):
        t = teacher(xb, training=False)
        with tf.GradientTape() as tape:
            s = student(xb, training=True)
            soft = tf.reduce_mean(tf.reduce_sum(
                tf.nn.softmax(t / temp) * (tf.nn.log_softmax(t / temp) - tf.nn.log_softmax(s / temp)), axis=1))
            loss = alpha * temp * temp * soft
            if hard:
                ce = tf.keras.losses.sparse_categorical_crossentropy(yb, s, from_logits=True)
                loss += (1 - alpha) * tf.reduce_mean(ce)
        grads = tape.gradient(loss, student.trainable_variables)
        opt.apply_gradients(zip(grads, student.trainable_variables))
        return loss

    rng = np.random.default_rng(cfg.seed)
    std = x.reshape(-1, x.shape[-1]).std(axis=0).astype(np.float32)
    batch = min(cfg.batch_size, len(x))
    order, pos = rng.permutation(len(x)), 0
    for _ in range(cfg.steps):
        if pos + batch > len(x):
            order, pos = rng.permutation(len(x)), 0
        idx, pos = order[pos:pos + batch], pos + batch
        if y is not None:  # labelled rows are not mixed: the hard term needs their true class
            step(tf.constant(x[idx]), tf.constant(y[idx]), True)
        else:  # fresh augmentation every time a row comes round again
            step(tf.constant(_augment(x[idx], rng, cfg, std)), tf.constant(np.zeros(len(idx), np.int64)), False)
    return [np.asarray(w, np.float32) for w in student.get_weights()]


def closer_at_int8(spec, teacher, rows: np.ndarray, calibration: np.ndarray,
                   candidates: dict[str, list[np.ndarray]]) -> tuple[str, list[np.ndarray]]:
    """(name, weights) of the candidate whose full-int8 model agrees most with the teacher on `rows` (the transfer
    rows: the held-out evaluation rows only measure the result, they never choose it). For a student of the
    teacher's own architecture the candidates are the distilled weights and the teacher's own: post-training
    quantisation of the exact weights loses only rounding, distillation also what the transfer rows do not cover."""
    from device.runtime import Int8Model
    from firmware_models.convert import int8_tflite

    target = np.argmax(predict(teacher, rows), axis=1)
    scores = {name: float(np.mean(np.argmax(Int8Model(int8_tflite(spec, w, calibration)).infer(rows), axis=1)
                                  == target)) for name, w in candidates.items()}
    best = max(scores, key=lambda name: scores[name])   # ties: the first (distilled)
    return best, candidates[best]


def distill_round(teacher_name: str, teacher_weights: np.ndarray | list[np.ndarray], teacher_options: dict,
                  key: Ed25519PrivateKey, out_dir: str | os.PathLike, version: int,
                  proxy_x: np.ndarray | None = None, proxy_y: np.ndarray | None = None,
                  eval_x: np.ndarray | None = None, eval_y: np.ndarray | None = None,
                  targets: list[StudentTarget] | None = None, cfg: DistillConfig | None = None,
                  previous: dict[str, list[np.ndarray]] | None = None,
                  versions: dict[str, int] | None = None, teacher_version: int | None = None,
                  features: dict | None = None) -> list[StudentReport]:
    """Distil the teacher (the global model: flat vector or tensors in layout order) into one int8 student per
    target, bundle each under `out_dir/<device_class>` at `version`, and report size, agreement and accuracy.

    Transfer rows: `proxy_x` (labels `proxy_y` optional) or, when None, synthetic rows by teacher inversion.
    Agreement/accuracy are measured on `eval_x`/`eval_y` when given, else on a held-back fifth of the transfer
    rows. `previous` {device_class: float weights} warm-starts the students (the cloud keeps them between rounds).
    Each student's bundle is named `student_name(teacher, class)`, at `versions[class]` (default `version`), and
    records `teacher_version` (and `features`, the federation's feature transform, which the student's inference
    applies to raw rows: the transfer and evaluation rows here are already transformed). The quality gate
    (cfg.min_agreement, cfg.min_accuracy_ratio) and the size budget
    set `refused`; a refused student keeps its bundle directory for inspection but must not be pushed.
    """
    from device.runtime import Int8Model
    from firmware_models import keras_model, model_spec
    from firmware_models.build import build_student_bundle

    cfg = cfg or DistillConfig()
    spec = model_spec(teacher_name, **teacher_options)
    tensors = (unflatten(np.asarray(teacher_weights, np.float32), spec.layout)
               if isinstance(teacher_weights, np.ndarray) else list(teacher_weights))
    teacher = keras_model(teacher_name, tensors, **teacher_options)
    teacher_bytes = len(float_tflite(teacher_name, tensors, **teacher_options))
    if proxy_x is None:
        proxy_x, proxy_y = synthetic_inputs(teacher, spec.input_shape, spec.n_classes, cfg), None
    proxy_x = np.asarray(proxy_x, np.float32)
    if eval_x is None:  # hold back a fifth of the transfer rows for the agreement measurement
        cut = len(proxy_x) * 4 // 5
        eval_x, eval_y = proxy_x[cut:], None
        proxy_x, proxy_y = proxy_x[:cut], None if proxy_y is None else proxy_y[:cut]
    teacher_logits = predict(teacher, eval_x)
    teacher_acc = None if eval_y is None else float(np.mean(np.argmax(teacher_logits, axis=1) == eval_y))
    reports = []
    for target in targets or default_targets(teacher_name, teacher_options):
        start = time.monotonic()
        weights = distil(teacher, target, proxy_x, proxy_y, cfg, (previous or {}).get(target.device_class))
        calibration = proxy_x[np.random.default_rng(cfg.seed).permutation(len(proxy_x))[:cfg.calibration_rows]]
        method, student_spec = "distilled", model_spec(target.model, **target.options)
        if (student_spec.name, list(student_spec.layout)) == (spec.name, list(spec.layout)):   # the teacher's own
            method, weights = closer_at_int8(student_spec, teacher, proxy_x, calibration,
                                             {"distilled": weights, "quantised teacher": tensors})
        float_agree = agreement(predict(keras_model(target.model, weights, **target.options), eval_x),
                                teacher_logits)
        name = student_name(teacher_name, target.device_class)
        student_version = (versions or {}).get(target.device_class, version)
        bundle = build_student_bundle(target.model, Path(out_dir) / target.device_class, key, weights, calibration,
                                      version=student_version, bundle_name=name,
                                      extra={"teacher_version": teacher_version if teacher_version is not None
                                             else version, **({"features": features} if features else {})},
                                      **{**target.options, "device_class": target.device_class})
        model = (bundle / "model.tflite").read_bytes()
        logits = Int8Model(model).infer(eval_x)
        report = StudentReport(
            target.device_class, target.model, dict(target.options), student_version, bundle, len(model),
            teacher_bytes, agreement(logits, teacher_logits),
            None if eval_y is None else float(np.mean(np.argmax(logits, axis=1) == eval_y)), teacher_acc,
            float_agree, time.monotonic() - start, weights, name, eval_rows=len(eval_x), method=method)
        refused = gate(report, cfg.min_agreement, cfg.min_accuracy_ratio)
        if len(model) > target.max_bytes:  # over the class's budget: reported, never pushed
            shutil.rmtree(bundle)
            report = replace(report, bundle=None)
            refused = f"{len(model)} B over the {target.max_bytes} B budget of class {target.device_class}"
        reports.append(replace(report, refused=refused))
    return reports


@dataclass(frozen=True)
class DistillSchedule:
    """`[distill]` of cloud.toml (configs/cloud.toml documents every key): distil the global model every N rounds,
    gate the students on held-out rows and push those that pass (cloud/push.py)."""

    every_rounds: int = 10        # 0 = never
    proxy: Path | None = None     # transfer set: NPZ (x, optional y) of public/consented recordings the cloud may
                                  # hold (never device data); None = synthetic rows by teacher inversion
    steps: int = 2500             # optimizer steps per student
    classes: list[str] = field(default_factory=lambda: ["wearable", "pi"])  # device classes to distil for
    min_agreement: float = 0.9    # quality gate on the held-out rows (eval_data, else a fifth of the proxy):
    min_accuracy_ratio: float = 0.9  # int8 agreement with the teacher, and student accuracy / teacher accuracy
    bundle_key: Path | None = None  # Ed25519 key signing the students (devices' bundle_pubkey); None = signing_key
    push: bool = True             # push every student that passes to its class behind every edge
    push_wait_s: float = 0.0      # wait this long for the devices' outcomes (distill.jsonl lists them)
    message_cap: int = 256 * 1024  # the brokers' message cap (chunks stay under it)

    def __post_init__(self) -> None:
        from protocol.topics import DEVICE_CLASSES

        unknown = [c for c in self.classes if c not in DEVICE_CLASSES]
        if unknown:
            raise ValueError(f"distill.classes {unknown} not in {DEVICE_CLASSES}")

    def config(self) -> DistillConfig:
        return DistillConfig(steps=self.steps, every_rounds=self.every_rounds, min_agreement=self.min_agreement,
                             min_accuracy_ratio=self.min_accuracy_ratio)
