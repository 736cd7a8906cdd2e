"""`fediomt bench distill`: int8 students of the smartwatch teacher (size, accuracy, top-1 agreement, LiteRT
latency) for three transfer sets, and the OTA push of the wearable student to 5 and 50 devices through a
Mosquitto capped at 16 KB per message.

Setup: the `watch` federation (seglearn, 10 subjects). The teacher is `wearable_cnn` with 64 filters (the
architecture the Pi class trains) fitted centrally on the training windows of subjects 3-10, standing in for the
federation's global model. Transfer sets for distillation: "pooled" (all subjects' training windows, unlabeled: a
proxy set from the same sensor population), "public" (only subjects 1-2, whose data the teacher never saw:
a small consented/open set), "synthetic" (teacher inversion, no data). Everything is evaluated on the held-out
last 20% of every recording.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from protocol.table import print_table

TEACHER = {"n_classes": 7, "filters": 64}
WEARABLE = {"n_classes": 7, "filters": 16}
PI = {"n_classes": 7, "filters": 32}
MESSAGE_CAP = 16 * 1024
PUBLIC_SUBJECTS = 2


def train_teacher(x: np.ndarray, y: np.ndarray, epochs: int) -> list[np.ndarray]:
    import keras

    from firmware_models import keras_model

    keras.utils.set_random_seed(0)
    model = keras_model("wearable_cnn", **TEACHER)
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return [np.asarray(w) for w in model.get_weights()]


def infer_us(model_bytes: bytes, rows: np.ndarray, calls: int) -> float:
    """Microseconds per single-row inference of an int8 student in LiteRT (one thread, as on a device)."""
    from device.runtime import Int8Model

    model = Int8Model(model_bytes, num_threads=1)
    for row in rows[:10]:
        model.infer(row[None])
    start = time.perf_counter()
    for i in range(calls):
        model.infer(rows[i % len(rows)][None])
    return (time.perf_counter() - start) / calls * 1e6


def on_device_inference(bundle: Path, pubkey: Path, windows: Path, calls: int) -> dict[str, dict]:
    """`fediomt device predict --bench` in a fresh process per runtime (what a wearable runs, no TensorFlow):
    latency of one window (median, p95), peak RSS, accuracy on the held-out windows. LiteRT in this venv, and
    where `./run` made them, tflite-runtime 2.14 + NumPy 1.x (.venv-tflite214) and the ai-edge-litert 1.x that
    fediomt[device] installs (.venv-litert1)."""
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    runs = {"litert": (sys.executable, "ai_edge_litert")}
    for name, venv, runtime in (("tflite214", ".venv-tflite214", "tflite_runtime"),
                                ("litert1", ".venv-litert1", "ai_edge_litert")):
        if (repo / venv / "bin" / "python").exists():
            runs[name] = (str(repo / venv / "bin" / "python"), runtime)
    out = {}
    for name, (python, runtime) in runs.items():
        proc = subprocess.run([python, "-m", "fediomt", "device", "predict", str(bundle), str(windows), "--pubkey",
                               str(pubkey), "--output", "", "--bench", str(calls), "--threads", "1"], cwd=repo,
                              env={**os.environ, "FEDIOMT_RUNTIME": runtime}, capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            out[name] = {"error": proc.stderr.strip()[-300:]}
            continue
        summary = json.loads(proc.stderr.strip().splitlines()[-1])
        out[name] = {"infer_us_median": summary["latency_us_median"], "infer_us_p95": summary["latency_us_p95"],
                     "predict_rss_mb": summary["peak_rss_mb"], "predict_accuracy": summary.get("accuracy"),
                     "tensorflow_imported": summary["tensorflow_imported"]}
    return out


def push_seconds(bundle: Path, key, n_devices: int, samples: np.ndarray, tmp: Path, device_class: str = "wearable"
                 ) -> float:
    """Wall time from the start of `push_bundle` until every device has installed (and smoke-tested) it."""
    from cloud.push import push_bundle
    from device.ota import OtaClient, OtaConfig
    from experiments.mosquitto import MosquittoBroker
    from protocol.mqtt import ConnectionConfig

    with MosquittoBroker(extra_config=[f"message_size_limit {MESSAGE_CAP}"], workdir=tmp / f"mq{n_devices}") as mq:
        broker = ConnectionConfig(host=mq.host, port=mq.port)
        devices = [OtaClient(f"d{i}", broker,
                             OtaConfig("edge1", device_class, tmp / f"{device_class}{n_devices}-d{i}"),
                             key.public_key(), key.public_key(), samples=lambda: samples).start()
                   for i in range(n_devices)]
        try:
            for d in devices:
                d.conn.connected.wait(10)
            start = time.monotonic()
            push_bundle(bundle, device_class, ["edge1"], broker, key,
                        message_cap=MESSAGE_CAP)
            deadline = start + 120
            while any(d.receiver.installed_version == 0 for d in devices):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{sum(d.receiver.installed_version > 0 for d in devices)}/{n_devices} "
                                       "devices installed the bundle")
                time.sleep(0.005)
            return time.monotonic() - start
        finally:
            for d in devices:
                d.stop()


def run(args: argparse.Namespace) -> dict:
    from cloud.distill import DistillConfig, StudentTarget, distill_round
    from experiments.datasets import load
    from protocol.signing import generate_signing_key

    quick = getattr(args, "quick", False)
    fed = load("watch")
    public, private = fed.clients[:PUBLIC_SUBJECTS], fed.clients[PUBLIC_SUBJECTS:]
    teacher = train_teacher(np.concatenate([c.x for c in private]), np.concatenate([c.y for c in private]),
                            epochs=2 if quick else 12)
    proxies = {"pooled": fed.pooled()[0], "public": np.concatenate([c.x for c in public]), "synthetic": None}
    if quick:
        proxies = {"pooled": proxies["pooled"][::4]}
    cfg = DistillConfig(steps=60 if quick else 2500, synthetic_rows=4096)
    key = generate_signing_key()
    rows, figures = [], {}
    with tempfile.TemporaryDirectory(prefix="fediomt-bench-distill-") as tmp:
        tmp = Path(tmp)
        for proxy, x in proxies.items():
            targets = [StudentTarget("wearable", "wearable_cnn", WEARABLE, 32 * 1024)]
            if proxy == "pooled":
                targets.append(StudentTarget("pi", "wearable_cnn", PI, 256 * 1024))
            reports = distill_round("wearable_cnn", teacher, TEACHER, key, tmp / proxy, version=1, proxy_x=x,
                                    eval_x=fed.x_test, eval_y=fed.y_test, targets=targets, cfg=cfg)
            for r in reports:
                rows.append({"transfer": proxy, "class": r.device_class, "filters": r.options["filters"],
                             "student_B": r.student_bytes, "teacher_B": r.teacher_bytes,
                             "ratio": r.teacher_bytes / r.student_bytes, "student_acc": r.student_accuracy,
                             "teacher_acc": r.teacher_accuracy, "agreement": r.agreement,
                             "float_agreement": r.float_agreement, "seconds": r.seconds})
        wearable = next(r for r in rows if r["transfer"] == "pooled" and r["class"] == "wearable")
        bundle = tmp / "pooled" / "wearable"
        figures = {
            "teacher_bytes": wearable["teacher_B"], "student_bytes": wearable["student_B"],
            "size_ratio": wearable["ratio"], "teacher_accuracy": wearable["teacher_acc"],
            "student_accuracy": wearable["student_acc"], "agreement": wearable["agreement"],
            "float_agreement": wearable["float_agreement"],
            "int8_infer_us": infer_us((bundle / "model.tflite").read_bytes(), fed.x_test, 200 if quick else 2000),
        }
        figures.update({f"agreement_{r['transfer']}": r["agreement"] for r in rows if r["class"] == "wearable"})
        figures.update({f"student_accuracy_{r['transfer']}": r["student_acc"] for r in rows
                        if r["class"] == "wearable"})
        pi = next(r for r in rows if r["class"] == "pi")
        figures.update({"pi_student_bytes": pi["student_B"], "pi_agreement": pi["agreement"]})
        from protocol.signing import save_public_key

        save_public_key(key.public_key(), tmp / "bundle.pub")
        np.savez(tmp / "windows.npz", x=fed.x_test, y=fed.y_test)
        for runtime, runtime_figures in on_device_inference(bundle, tmp / "bundle.pub", tmp / "windows.npz",
                                                            200 if quick else 2000).items():
            figures.update({f"{runtime}_{k}": v for k, v in runtime_figures.items()})
        from cloud.push import archive_of

        figures["push_bundle_bytes"] = len(archive_of(bundle))
        samples = fed.x_test[:8]
        figures["push_s_5_devices"] = push_seconds(bundle, key, 5, samples, tmp)
        if not quick:
            figures["push_s_50_devices"] = push_seconds(bundle, key, 50, samples, tmp)
            # the Pi class gets the trainable teacher architecture: a bundle of many chunks under the 16 KB cap
            from firmware_models import build_bundle

            pi_bundle = build_bundle("wearable_cnn", tmp / "teacher-bundle", key, version=1, **TEACHER)
            figures["pi_push_bundle_bytes"] = len(archive_of(pi_bundle))
            for n in (5, 50):
                figures[f"pi_push_s_{n}_devices"] = push_seconds(pi_bundle, key, n, samples, tmp, "pi")
    print_table(rows)
    print_table([{k: v for k, v in figures.items() if not k.startswith(("agreement_", "student_accuracy_"))}])
    return figures
