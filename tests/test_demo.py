"""End to end: a short `fediomt demo` (real Mosquitto, cloud, edges, devices and ledger replicas as processes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fediomt.demo import SMALL_DEVICE_DP, DemoSettings, recipe_for, run_demo

pytestmark = pytest.mark.slow


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def test_short_demo_report(tmp_path):
    # noise 1.5 at the demo's Poisson batch of 128: epsilon ~7 of 12 after 5 rounds (noise 1: 12.4, over budget)
    settings = DemoSettings(rounds=5, devices=4, device_epsilon=12.0, distill_steps=300, noise_mult=1.5)
    run_dir = tmp_path / "run"
    report = run_demo(settings, run_dir, timeout_s=400, baseline=False)
    assert report["completed"], (run_dir / "logs" / "cloud.log").read_text()[-3000:]
    assert json.loads((run_dir / "report.json").read_text())["final_accuracy"] == report["final_accuracy"]
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4, 5]
    assert report["final_accuracy"] > 1 / 7 + 0.1  # 7 exercises: chance is 0.14
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in report["rounds"])
    assert report["total_bytes_up"] * 5 < report["dense_bytes_up"]
    # both directions count: the compressed delta downlink (version 1 goes out in full, then deltas), and every
    # link up + down against dense FedAvg's full float32 models and dense updates over the same rounds
    downs = [r["bytes_down"] for r in report["rounds"]]
    assert downs[1] * 4 < downs[0] and downs[2] * 4 < downs[0]
    assert report["dense_total_bytes"] > 2.5 * report["total_bytes"] > 0
    assert report["bytes_ratio"] == report["dense_total_bytes"] / report["total_bytes"]
    assert report["total_bytes"] > report["total_bytes_up"] + report["total_bytes_down"]   # + the edge <-> cloud hop
    assert all(r["auroc"] is None for r in report["rounds"])   # 7 classes: no binary scores
    eps = [r["epsilon"] for r in report["rounds"]]
    assert all(e is not None for e in eps) and eps == sorted(eps) and eps[-1] <= settings.device_epsilon
    # calibrated noise (the default): at 1.5 five rounds would spend ~7; each device lowers its noise to spend ~12
    from device.state import load_state

    noise = {e.noise_mult for p in (run_dir / "devices").glob("*/state/state.npz") for e in load_state(p).history}
    assert noise and max(noise) <= 1.5 and min(noise) < 1.4 and eps[-1] > 0.95 * settings.device_epsilon
    assert "each device's noise calibrated to its own data (at most 1.5)" in (run_dir / "report.md").read_text()
    assert report["ledger"]["valid"] and report["ledger"]["blocks"] == 1 + 5
    minted = sum(report["ledger"]["balances"].values())  # 1000 a round, or 0 when no edge improved the model
    assert minted % 1000 == 0 and minted <= 5 * 1000
    assert (run_dir / "accuracy_bytes.png").stat().st_size > 1000
    assert {s["device_class"] for s in report["students"]} == {"wearable", "pi"}
    assert all(s["student_bytes"] < s["teacher_bytes"] for s in report["students"])
    # after 3 rounds the teacher is weak: the quality gate may refuse a student (the e2e inference path is
    # tests/test_student_fleet.py); what holds either way:
    for s in report["students"]:  # the quality gate: pushed, or refused with its reason, never both
        assert (s["pushed_s"] is not None) != bool(s["refused"]), s
    pushed = {s["device_class"]: s for s in report["students"] if s["pushed_s"] is not None}
    if "wearable" in pushed:  # both edges' inference wearables installed it and classified their windows with it
        assert list(pushed["wearable"]["devices"].values()) == ["installed", "installed"]
        assert len(report["inference"]) == 2 and all(w["predictions"] > 0 for w in report["inference"])
    if "pi" in pushed:  # the trainers (the Pis) refuse an int8 student before install, and say so
        assert len(pushed["pi"]["devices"]) == 4
        assert all(o.startswith("refused") for o in pushed["pi"]["devices"].values())
    assert report["processes_left"] == []
    assert processes_mentioning(str(run_dir)) == []


def test_the_batch_of_128_recipe_is_watchs_alone():
    """Watch's tuned DP-SGD recipe (Poisson batches of 128) needs devices with >= 128 rows: heart and --data keep
    batches of 32 and their own noise and lr, and an explicit --noise-mult / --lr wins on every dataset."""
    assert recipe_for("watch") == {"batch_size": 128, "noise_mult": 3.83, "lr": 3.0}
    assert recipe_for("heart") == recipe_for("data") == SMALL_DEVICE_DP
    assert recipe_for("heart", noise_mult=0.0, lr=0.2) == {"batch_size": 32, "noise_mult": 0.0, "lr": 0.2}
    assert recipe_for("watch", noise_mult=5.0) == {"batch_size": 128, "noise_mult": 5.0, "lr": 3.0}
