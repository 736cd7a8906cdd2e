"""`fediomt bench train-step`: one batch-32 DP-SGD step in LiteRT vs the same step as a TF `tf.function`,
peak RSS of a TensorFlow-free process running 100 DP steps from a bundle, and bundle sizes (fp32 vs int8)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("har_mlp", "wearable_cnn", "vitals_mlp")
RSS_STEPS = 100


def _ms_per_call(fn, steps: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1e3


def _peak_rss_mb() -> float:
    """VmHWM of this process. Not ru_maxrss: Linux keeps that across fork+exec, so a child spawned by this
    (TensorFlow-laden) benchmark would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux; best effort elsewhere


def rss_child(bundle_dir: str, pubkey: str) -> dict:
    """Runs in a fresh interpreter: load the bundle, 100 DP steps with CSPRNG noise; TF must never be imported."""
    from device.runtime import TrainableModel
    from protocol.bundle import load_bundle
    from protocol.signing import load_public_key

    bundle = load_bundle(bundle_dir, load_public_key(pubkey))
    model = TrainableModel(bundle.model_bytes, bundle.manifest)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(model.batch_size, *model.input_shape)).astype(np.float32)
    y = rng.integers(0, model.n_classes, model.batch_size).astype(np.int32)
    for _ in range(RSS_STEPS):
        model.train_step(x, y, None, lr=0.05, clip=1.0, noise_mult=1.1)
    return {"peak_rss_mb": _peak_rss_mb(), "tensorflow_imported": "tensorflow" in sys.modules}


def _peak_rss(bundle_dir: Path, pubkey: Path) -> dict:
    code = ("import json, sys; from experiments.bench.train_step import rss_child; "
            "print(json.dumps(rss_child(sys.argv[1], sys.argv[2])))")
    out = subprocess.run([sys.executable, "-c", code, str(bundle_dir), str(pubkey)], check=True, capture_output=True,
                         text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(name: str, steps: int, workdir: Path, key) -> dict:
    import tensorflow as tf

    from device.runtime import TrainableModel
    from firmware_models.build import build_trainable
    from firmware_models.convert import int8_tflite
    from firmware_models.models import FirmwareModule, model_spec
    from protocol.bundle import write_bundle

    model_bytes, manifest = build_trainable(name)
    bundle_dir = write_bundle(workdir / name, model_bytes, manifest, key)
    spec = model_spec(name)
    rng = np.random.default_rng(0)
    student = int8_tflite(spec, spec.init_weights(0), rng.normal(size=(200, *spec.input_shape)).astype(np.float32))

    litert = TrainableModel(model_bytes, manifest)
    batch = litert.batch_size
    x = rng.normal(size=(batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.n_classes, batch).astype(np.int32)
    noise = rng.standard_normal(litert.n_params).astype(np.float32)
    hp = dict(lr=0.01, clip=1.0, noise_mult=1.1)
    litert_ms = _ms_per_call(lambda: litert.train_step(x, y, noise, **hp), steps)

    module = FirmwareModule(spec, batch_size=batch)
    zeros = tf.zeros([litert.n_params])
    f32 = lambda v: tf.constant([v], tf.float32)  # noqa: E731  (hyperparameters are [1], issue 22)
    args = [tf.constant(x), tf.constant(y), tf.ones([batch]), tf.constant(noise), f32(hp["lr"]), f32(hp["clip"]),
            f32(hp["noise_mult"]), f32(batch), f32(1.0), f32(0.0), zeros, zeros]
    tf_ms = _ms_per_call(lambda: module.train(*args), steps)

    rss = _peak_rss(bundle_dir, workdir / "signing.pub")
    return {"model": name, "n_params": litert.n_params, "litert_dp_step_ms": litert_ms,
            "tf_function_dp_step_ms": tf_ms, "tf_over_litert": tf_ms / litert_ms, "peak_rss_mb": rss["peak_rss_mb"],
            "rss_process_imported_tf": rss["tensorflow_imported"], "trainable_bytes": len(model_bytes),
            "int8_student_bytes": len(student)}


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from protocol.signing import generate_signing_key, save_public_key
    from protocol.table import print_table

    steps = 50 if args.quick else 500
    key = generate_signing_key()
    with tempfile.TemporaryDirectory(prefix="fediomt-bench-") as tmp:
        workdir = Path(tmp)
        save_public_key(key.public_key(), workdir / "signing.pub")
        rows = [measure(name, steps, workdir, key) for name in MODELS]
    print_table(rows, ["model", "n_params", "litert_dp_step_ms", "tf_function_dp_step_ms", "tf_over_litert",
                       "peak_rss_mb", "trainable_bytes", "int8_student_bytes"])
    return {"batch_size": 32, "steps_timed": steps, "rss_steps": RSS_STEPS, "models": rows}
