"""Students on a mixed fleet, end to end with a real Mosquitto and real `fediomt device run` processes: two
wearables (compute class "wearable", mode "auto", a trainable bundle at start) and two Pis (mode "train").

A student pushed to the wearable class installs on both wearables, which switch to inference and classify the
windows they read from a FIFO and a growing file; the Pis keep training. A student pushed to the Pi class, and a
broken bundle pushed to the wearables, are refused before install and every device keeps running. A rollback pins:
the rolled-back version stays refused across a restart. A withdrawn push is not downloaded by a device that
connects afterwards. `fediomt device predict` classifies a file once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from cloud.distill import student_name  # noqa: E402
from cloud.push import push_bundle  # noqa: E402
from device.runtime import Int8Model  # noqa: E402
from experiments.sandbox import ScriptedCloud  # noqa: E402
from protocol.bundle import load_bundle, write_bundle  # noqa: E402
from protocol.mqtt import ConnectionConfig  # noqa: E402
from protocol.signing import generate_signing_key, load_private_key, load_public_key, save_public_key  # noqa: E402
from protocol.topics import bundle_manifest_topic  # noqa: E402

from .harness import (  # noqa: E402
    DEV_KEY,
    DEV_PUB,
    MODEL,
    PLAN,
    Recorder,
    bundle_weights,
    provision_device,
    wait_for,
)

CAP = 16 * 1024


def build_student(out: Path, version: int, seed: int) -> Path:
    from firmware_models.build import build_student_bundle
    from firmware_models.models import model_spec

    spec = model_spec(MODEL, n_classes=7)
    calib = np.random.default_rng(seed).normal(size=(64, 100, 6)).astype(np.float32)
    return build_student_bundle(MODEL, out, load_private_key(DEV_KEY), spec.init_weights(seed), calib,
                                version=version, bundle_name=student_name(MODEL, "wearable"), n_classes=7,
                                device_class="wearable")


def window_lines(x: np.ndarray) -> str:
    return "".join(",".join(f"{v:.5f}" for v in row.reshape(-1)) + "\n" for row in x)


def predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def log_has(config: Path, text: str, after: int = 0) -> bool:
    log = config.parent / "agent.log"
    return log.exists() and text in log.read_text()[after:]


def test_student_on_a_mixed_fleet(tmp_path, broker, daemons):
    cloud_key = generate_signing_key()
    save_public_key(cloud_key.public_key(), tmp_path / "cloud.pub")
    cloud = ScriptedCloud(broker.port, "e1", cloud_key)
    conn = ConnectionConfig(host=broker.host, port=broker.port)
    bundle_pub = load_public_key(DEV_PUB)
    v1, v2 = build_student(tmp_path / "student-v1", 1, 1), build_student(tmp_path / "student-v2", 2, 2)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(12, 100, 6)).astype(np.float32)

    fifo = tmp_path / "w1.fifo"
    os.mkfifo(fifo)
    (tmp_path / "w2.txt").write_text(window_lines(x[:3]))
    wearable = {"compute_class": "wearable"}
    configs = {
        "w1": provision_device(tmp_path, "w1", broker.port, capability=wearable,
                               inference={"input": str(fifo), "output": "pred.jsonl"}),
        "w2": provision_device(tmp_path, "w2", broker.port, capability=wearable,
                               inference={"input": str(tmp_path / "w2.txt"), "output": "pred.jsonl"}),
        "p1": provision_device(tmp_path, "p1", broker.port, mode="train"),
        "p2": provision_device(tmp_path, "p2", broker.port, mode="train"),
    }
    procs = {}

    def start(name: str):
        procs[name] = daemons.process("device", "run", "--config", str(configs[name]),
                                      log=configs[name].parent / "agent.log")

    for name in configs:
        start(name)
    for name, config in configs.items():
        wait_for(lambda c=config: log_has(c, '"connected"'), 30, message=f"{name} connected")

    # 1. the student goes to the wearable class: both install it (the push says so) and switch to inference
    report = push_bundle(v1, "wearable", ["e1"], conn, cloud_key, message_cap=CAP, bundle_key=bundle_pub, wait_s=30)
    assert report.connected == ["w1", "w2"] and report.outcomes == {"w1": "installed", "w2": "installed"}
    assert not report.warnings
    for name in ("w1", "w2"):
        wait_for(lambda c=configs[name]: log_has(c, "inference model loaded"), 30, message=f"{name} inferring")
    with open(fifo, "w") as f:  # the FIFO's writer: a sensor process
        f.write(window_lines(x[:5]))
    out1, out2 = configs["w1"].parent / "pred.jsonl", configs["w2"].parent / "pred.jsonl"
    wait_for(lambda: len(predictions(out1)) == 5, 30, message="w1's 5 predictions")
    wait_for(lambda: len(predictions(out2)) == 3, 30, message="w2's 3 predictions")
    with open(tmp_path / "w2.txt", "a") as f:  # the file grows: followed
        f.write(window_lines(x[3:6]))
    wait_for(lambda: len(predictions(out2)) == 6, 30, message="w2's predictions of the appended windows")
    want = np.argmax(Int8Model(load_bundle(v1, bundle_pub).model_bytes).infer(x[:6]), axis=1)
    assert [p["class"] for p in predictions(out2)] == list(want)
    assert [p["class"] for p in predictions(out1)] == list(want[:5])
    assert {(p["bundle"], p["version"]) for p in predictions(out1)} == {(student_name(MODEL, "wearable"), 1)}

    # 2. the Pis keep training
    weights = bundle_weights() + 0.01
    cloud.publish_model(MODEL, 1, weights)
    cloud.announce(1, MODEL, 1, PLAN)
    trained = {cloud.next_update(60)[0].device_id for _ in range(2)}
    assert trained == {"p1", "p2"}

    # 3. a student pushed to the Pi class is refused before install by training devices: they keep training
    report = push_bundle(v1, "pi", ["e1"], conn, cloud_key, message_cap=CAP, wait_s=30)
    assert report.connected == ["p1", "p2"]
    assert all(o.startswith("refused: BAD_VALUE") for o in report.outcomes.values()) and len(report.outcomes) == 2
    for name in ("p1", "p2"):
        assert load_bundle(configs[name].parent / "bundles" / "current", bundle_pub).name == MODEL
        assert not (configs[name].parent / "bundles" / "previous").exists()
    cloud.announce(2, MODEL, 1, PLAN)
    assert {cloud.next_update(60)[0].device_id for _ in range(2)} == {"p1", "p2"}

    # 4. a broken bundle (validly signed, the model does not load) is refused before install; devices keep running
    manifest = load_bundle(v1, bundle_pub).manifest
    broken = write_bundle(tmp_path / "broken", b"\0" * 4000, {**manifest, "version": 9}, load_private_key(DEV_KEY))
    report = push_bundle(broken, "wearable", ["e1"], conn, cloud_key, message_cap=CAP, wait_s=30)
    assert set(report.outcomes) == {"w1", "w2"} and all(o.startswith("refused") for o in report.outcomes.values())
    with open(tmp_path / "w2.txt", "a") as f:
        f.write(window_lines(x[6:7]))
    wait_for(lambda: len(predictions(out2)) == 7, 30, message="w2 still classifies after the broken push")
    assert all(p.poll() is None for p in procs.values())

    # 5. v2, then a rollback on w2: v2 is pinned out, across a restart, while its push stays retained
    report = push_bundle(v2, "wearable", ["e1"], conn, cloud_key, message_cap=CAP, bundle_key=bundle_pub, wait_s=30)
    assert report.outcomes == {"w1": "installed", "w2": "installed"}
    procs["w2"].send_signal(signal.SIGTERM)
    assert procs["w2"].wait(20) == 0
    from fediomt.cli import main

    assert main(["flash", "--rollback", str(configs["w2"].parent / "bundles")]) == 0
    size = len((configs["w2"].parent / "agent.log").read_text())
    start("w2")
    wait_for(lambda: log_has(configs["w2"], "pinned out", size), 30, message="w2 refuses the pinned v2")
    assert not log_has(configs["w2"], "ota transfer started", size)
    with open(tmp_path / "w2.txt", "a") as f:
        f.write(window_lines(x[7:8]))
    wait_for(lambda: len(predictions(out2)) >= 8, 30, message="w2 classifies with v1 after the restart")
    assert predictions(out2)[-1]["version"] == 1
    assert load_bundle(configs["w2"].parent / "bundles" / "current", bundle_pub).version == 1

    # 6. withdraw: nothing is retained, and a wearable that connects afterwards downloads nothing
    assert main(["push", "--withdraw", "--class", "wearable", "--edge", "e1", "--host", broker.host,
                 "--port", str(broker.port)]) == 0
    configs["w3"] = provision_device(tmp_path, "w3", broker.port, capability=wearable, mode="infer",
                                     inference={"input": str(tmp_path / "w3.txt"), "output": "pred.jsonl"})
    (tmp_path / "w3.txt").write_text(window_lines(x[:2]))
    start("w3")
    out3 = configs["w3"].parent / "pred.jsonl"
    wait_for(lambda: len(predictions(out3)) == 2, 30, message="w3 classifies with its own bundle")
    assert {p["bundle"] for p in predictions(out3)} == {MODEL}  # the trainable bundle's infer signature
    rec = Recorder(broker.port, [bundle_manifest_topic("e1", "wearable")], client_id="late-reader")
    try:  # subscribed before the constructor returned: a retained manifest would be here after a moment
        time.sleep(0.5)
        assert not [p for p in rec.payloads(bundle_manifest_topic("e1", "wearable")) if p]
    finally:
        rec.close()
    assert not log_has(configs["w3"], "ota transfer started")
    cloud.conn.close()


def test_predict_cli(tmp_path, capsys):
    from fediomt.cli import main

    v1 = build_student(tmp_path / "student", 1, 3)
    x = np.random.default_rng(0).normal(size=(20, 100, 6)).astype(np.float32)
    y = np.argmax(Int8Model(load_bundle(v1, load_public_key(DEV_PUB)).model_bytes).infer(x), axis=1)
    np.savez(tmp_path / "w.npz", x=x, y=y)
    assert main(["device", "predict", str(v1), str(tmp_path / "w.npz"), "--pubkey", str(DEV_PUB), "--bench", "50"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [p["class"] for p in lines] == list(y)
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["accuracy"] == 1.0 and summary["latency_us_median"] > 0 and summary["peak_rss_mb"] > 0
    (tmp_path / "w.txt").write_text(window_lines(x[:4]) + "# a comment\n\n")
    assert main(["device", "predict", str(v1), str(tmp_path / "w.txt"), "--pubkey", str(DEV_PUB)]) == 0
    assert [json.loads(line)["class"] for line in capsys.readouterr().out.splitlines()] == list(y[:4])
    # a bundle signed by another key is refused
    save_public_key(generate_signing_key().public_key(), tmp_path / "other.pub")
    assert main(["device", "predict", str(v1), str(tmp_path / "w.txt"), "--pubkey", str(tmp_path / "other.pub")]) == 1
