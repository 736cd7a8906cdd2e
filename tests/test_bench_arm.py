"""`fediomt bench arm` (experiments.bench.arm): the aarch64 full-system emulation harness.

Booting, installing and one round under TCG do not fit CI's 30 minutes on a loaded 2-core machine (the image build
alone runs debootstrap's arm64 second stage under qemu-user), so the VM run is a benchmark (README, docs/device.md
"ARM"); here: the pure parts, and the run itself only when asked for (FEDIOMT_ARM=1 with a cached image, or
FEDIOMT_ARM=local: the guest's job on this host, which needs the package index)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from experiments.bench import arm


def test_registered_and_recipe_is_stable(tmp_path: Path, monkeypatch) -> None:
    from fediomt.bench import BENCHMARKS

    assert BENCHMARKS["arm"][0] == "experiments.bench.arm:run"
    assert arm.recipe() == arm.recipe() and "linux-image-arm64" in arm.recipe()
    assert arm.host_mirror().startswith(("http://", "https://", "file:"))
    monkeypatch.setenv("FEDIOMT_ARM_CACHE", str(tmp_path))
    assert arm.cache_dir() == tmp_path and not arm.image_ready(tmp_path)


def test_guest_scripts_have_only_known_placeholders() -> None:
    job = arm.JOB.replace("@HOST@", "h").replace("@INDEX@", "i").replace("@W@", "w").replace("@V@", "v")
    assert "@" not in job.replace("$@", "")
    assert arm.GUEST_INIT.startswith("#!/bin/sh") and "sysrq-trigger" in arm.GUEST_INIT


def test_probe_ok_needs_every_task_and_the_tolerance() -> None:
    step = {"returncode": 0, "max_abs_diff_vs_x86": 3e-8}
    good = {"step:har_mlp": dict(step), "step-ref:har_mlp": dict(step),
            "infer:har_mlp_int8": {"returncode": 0, "argmax_agreement": 1.0}, "rounds": []}
    assert arm.probe_ok(good)
    assert not arm.probe_ok({"infer:har_mlp_int8": good["infer:har_mlp_int8"]})      # no step measured
    assert not arm.probe_ok({**good, "step:har_mlp": {"returncode": -11, "stderr_tail": "Segmentation fault"}})
    assert not arm.probe_ok({**good, "step:har_mlp": {"returncode": 0, "max_abs_diff_vs_x86": 2e-4}})
    assert not arm.probe_ok({**good, "infer:har_mlp_int8": {"returncode": 0, "argmax_agreement": 0.97}})


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FEDIOMT_ARM") not in ("1", "local"),
                    reason="FEDIOMT_ARM=1 boots the aarch64 VM (tens of minutes); =local runs its job on this host")
def test_bench_arm_one_round(tmp_path: Path) -> None:
    local = os.environ["FEDIOMT_ARM"] == "local"
    if not local and not arm.image_ready(arm.cache_dir()):
        pytest.skip(f"no cached image in {arm.cache_dir()}: python -m experiments.bench.arm build")
    figures = arm.run(argparse.Namespace(rounds=1, local=local, out=tmp_path, timeout=3000, smp=2))
    assert figures["federation_ok"] and figures["probe_ok"], figures
    steps = [v for k, v in figures.items() if k.startswith("step:")]
    assert steps and all(s["returncode"] == 0 and s["max_abs_diff_vs_x86"] <= 1e-4 for s in steps), steps
