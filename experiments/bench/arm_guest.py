"""Runs INSIDE the aarch64 guest of `fediomt bench arm` (experiments.bench.arm), from the installed wheel.

`python -m experiments.bench.arm_guest INPUTS.npz OUT_DIR`: for each task (one fixed-seed DP-SGD step per trainable
prebuilt bundle, the int8 student's inference) a child process, so that a crash (a LiteRT segfault) is recorded as
that task's exit code instead of losing the others. Writes OUT_DIR/guest.json and OUT_DIR/NAME.npz.
"""

from __future__ import annotations

import importlib
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STEPS_TIMED = 5


def _prebuilt() -> Path:
    import firmware_models

    return Path(firmware_models.__file__).resolve().parent / "prebuilt"


def _bundle(name: str):
    from protocol.bundle import load_bundle
    from protocol.signing import load_public_key

    prebuilt = _prebuilt()
    return load_bundle(prebuilt / name, load_public_key(prebuilt / "DEVELOPMENT_ONLY_signing.key.pub"))


def _phase(name: str) -> None:
    print(f"phase {name}", file=sys.stderr, flush=True)   # where a crash happened (the last phase printed)


def task(kind: str, name: str, inputs: Path, out: Path) -> dict:
    """`kind`: step (the runtime's defaults: XNNPACK delegate), step-nodelegate (builtin kernels, no default
    delegate), step-ref (LiteRT's reference kernels), infer (int8 student)."""
    t0 = time.perf_counter()
    import device.runtime as runtime
    from device.runtime import Int8Model, TrainableModel, interpreter_class

    import_s = time.perf_counter() - t0
    if kind in ("step-nodelegate", "step-ref"):
        import functools

        cls = interpreter_class()
        types = importlib.import_module(cls.__module__).OpResolverType
        choice = types.BUILTIN_REF if kind == "step-ref" else types.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        runtime.interpreter_class = lambda: functools.partial(cls, experimental_op_resolver_type=choice)
    data = np.load(inputs)
    bundle = _bundle(name)
    cls = interpreter_class()
    result = {"task": kind, "name": name, "import_s": round(import_s, 3),
              "interpreter": f"{cls.__module__}.{cls.__name__}"}
    if kind.startswith("step"):
        t = time.perf_counter()
        _phase("load")
        model = TrainableModel(bundle.model_bytes, bundle.manifest)
        _phase("infer")
        model.infer(data[f"{name}/x"])
        result["load_s"] = round(time.perf_counter() - t, 3)
        x, y, noise = data[f"{name}/x"], data[f"{name}/y"], data[f"{name}/noise"]
        lr, clip, noise_mult = (float(v) for v in data[f"{name}/hyper"])
        t = time.perf_counter()
        _phase("train")
        loss = model.train_step(x, y, noise, lr, clip, noise_mult)
        _phase("trained")
        result["first_step_s"] = round(time.perf_counter() - t, 4)
        np.savez(out / f"{kind}-{name}.npz", weights=model.get_flat(), loss=np.float32(loss))
        t = time.perf_counter()
        for _ in range(STEPS_TIMED):
            model.train_step(x, y, None, lr, clip, noise_mult)
        result["step_s"] = round((time.perf_counter() - t) / STEPS_TIMED, 4)
        result["loss"] = loss
    else:
        model = Int8Model(bundle.model_bytes)
        x = data[f"{name}/x"]
        t = time.perf_counter()
        logits = model.infer(x)
        result["infer_batch_s"] = round(time.perf_counter() - t, 4)
        t = time.perf_counter()
        for row in x[:16]:
            model.infer(row[None])
        result["infer_window_s"] = round((time.perf_counter() - t) / 16, 5)
        np.savez(out / f"{kind}-{name}.npz", logits=logits)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--task":
        kind, name, inputs, out = argv[1], argv[2], Path(argv[3]), Path(argv[4])
        print(json.dumps(task(kind, name, inputs, out)))
        return 0
    inputs, out = Path(argv[0]), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tasks = [tuple(t.split(":")) for t in np.load(inputs)["tasks"]]
    results = {"machine": platform.machine(), "python": platform.python_version(), "tasks": []}
    # import time of the device runtime in a fresh interpreter (the agent's start-up cost)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import device.runtime, device.agent"], check=False)
    results["import_device_agent_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=False)
    results["python_startup_s"] = round(time.perf_counter() - t, 2)
    for kind, name in tasks:
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "experiments.bench.arm_guest", "--task",
                               kind, name, str(inputs), str(out)], capture_output=True, text=True)
        entry = {"task": kind, "name": name, "returncode": proc.returncode}
        if proc.returncode == 0:
            entry.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            entry["stderr_tail"] = proc.stderr[-2000:]
        print(json.dumps(entry), flush=True)
        results["tasks"].append(entry)
    (out / "guest.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
