"""`fediomt bench device`: one device agent PROCESS over a 10-round run of wearable_cnn: peak RSS, CPU, bytes.

The agent is the real `python -m fediomt device run` against a private Mosquitto, with a scripted cloud/edge
(experiments.sandbox.ScriptedCloud) that publishes a signed global model and round announcement per round, waits for
the update, applies it (the next global model) and acks it. Data: one subject of the seglearn smartwatch set (real
IMU windows). Compression: none announced, so the device picks adaptive settings from its capability
(compute_class "wearable": top-k <= 1%, int8). Peak RSS is the kernel's high-water mark of the agent process since
its exec (VmHWM, read just before SIGTERM; the rusage of a forked child would also count the parent's pages from
before the exec), CPU seconds its rusage (os.wait4): everything it imported and ran (interpreter, paho, crypto).
Bytes are MQTT payload bytes per round (down: model + announcement + ack; up: update + status messages).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from device.runtime import TrainableModel
from experiments.mosquitto import MosquittoBroker
from experiments.sandbox import ScriptedCloud, provision
from protocol.bundle import load_bundle
from protocol.compression import decode_update, read_header
from protocol.messages import TrainingPlan
from protocol.signing import generate_signing_key, load_public_key, save_public_key
from protocol.table import print_table

REPO = Path(__file__).resolve().parents[2]
PREBUILT = REPO / "firmware_models" / "prebuilt"
MODEL = "wearable_cnn"
PLAN = TrainingPlan(lr=0.05, local_epochs=1, batch_size=32, clip=1.0, noise_mult=1.1)


def _subject_data() -> tuple[np.ndarray, np.ndarray, str]:
    """One watch subject's windows (the `data` extra's seglearn); on a device install without it, as many random
    windows of the same shape: the bench measures cost (RSS, CPU, bytes), which does not depend on the values."""
    try:
        from experiments.datasets.watch import load_watch_federation

        client = load_watch_federation().clients[0]
    except ImportError:   # seglearn (the `data` extra) is imported when the data is loaded
        rng = np.random.default_rng(0)
        return rng.normal(size=(300, 100, 6)).astype(np.float32), rng.integers(0, 7, 300), "synthetic (no [data])"
    return client.x, client.y, "watch subject"


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc (Linux only)")


def run(args: argparse.Namespace) -> dict:
    rounds = 3 if args.quick else 10
    pub = PREBUILT / "DEVELOPMENT_ONLY_signing.key.pub"
    bundle = load_bundle(PREBUILT / MODEL, load_public_key(pub))
    weights = TrainableModel(bundle.model_bytes, bundle.manifest).get_flat()
    x, y, data = _subject_data()
    with tempfile.TemporaryDirectory(prefix="fediomt-bench-device-") as tmp, \
            MosquittoBroker(workdir=Path(tmp) / "mosquitto") as broker:
        root = Path(tmp)
        cloud_key = generate_signing_key()
        save_public_key(cloud_key.public_key(), root / "cloud.pub")
        config = provision(root / "dev", "bench-dev", "e1", PREBUILT / MODEL, pub, root / "cloud.pub", x, y,
                           broker.port, capability={"compute_class": "wearable", "memory_mb": 256,
                                                    "bandwidth_bps": 250_000.0}, privacy={"epsilon": 8.0})
        cloud = ScriptedCloud(broker.port, "e1", cloud_key)
        log = open(root / "agent.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, "-m", "fediomt", "device", "run", "--config", str(config)],
                                cwd=REPO, stdout=log, stderr=log)
        round_s, steps, header, epsilon = [], [], None, 0.0
        try:
            for r in range(1, rounds + 1):
                start = time.perf_counter()
                cloud.publish_model(MODEL, r, weights)
                cloud.announce(r, MODEL, r, PLAN, deadline_s=120)
                update, _ = cloud.next_update(120)
                cloud.ack(update)
                round_s.append(time.perf_counter() - start)
                steps.append(update.local_steps)
                weights = weights + decode_update(update.delta, update.n_params)
                header, epsilon = read_header(update.delta, update.n_params), update.privacy.epsilon
            time.sleep(0.2)  # the ack and the last status reach the broker/agent
            peak_kb = _peak_rss_kb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            log.close()
            cloud.close()
    figures = {
        "model": MODEL, "rounds": rounds, "samples": int(len(x)), "data": data,
        "peak_rss_mb": round(peak_kb / 1024, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "bytes_up_per_round": round(cloud.bytes_up / rounds), "bytes_down_per_round": round(cloud.bytes_down / rounds),
        "round_s_mean": round(float(np.mean(round_s)), 3),
        "local_steps_per_round": round(float(np.mean(steps)), 1), "epsilon_spent": round(epsilon, 3),
        "compression": "none" if header is None else
                       f"{header.method} {header.k / header.n_params:.3g} int{header.bits}",
        "exit_code": proc.returncode,
    }
    print_table([figures])
    return figures
