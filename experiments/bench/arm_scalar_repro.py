"""Minimal reproducer of the LiteRT 1.4.0 aarch64 crash of docs/litert-aarch64-train-crash.md (issue 22).

    python -m experiments.bench.arm_scalar_repro build DIR   # needs TensorFlow: DIR/scalar.tflite, DIR/vector.tflite
    python -m experiments.bench.arm_scalar_repro run DIR     # needs only ai-edge-litert (or tflite-runtime) + numpy

`scalar.tflite`: one signature `f(s: float32[], v: float32[4]) -> v * s + 1` (builtin MUL and ADD only);
`vector.tflite`: the same with `s: float32[1]`. `run` calls each through a SignatureRunner, then calls
`resize_tensor_input(i, [])` on the scalar model without a signature. Each case runs in a child process, so a
SIGSEGV is reported as that case's exit code (-11) instead of ending the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def build(out: Path) -> None:
    import tensorflow as tf

    out.mkdir(parents=True, exist_ok=True)
    for name, s_shape in (("scalar", []), ("vector", [1])):
        module = tf.Module()
        module.f = tf.function(lambda s, v: {"y": v * s + 1.0}, input_signature=[
            tf.TensorSpec(s_shape, tf.float32, name="s"), tf.TensorSpec([4], tf.float32, name="v")])
        converter = tf.lite.TFLiteConverter.from_concrete_functions([module.f.get_concrete_function()], module)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        (out / f"{name}.tflite").write_bytes(converter.convert())


def _interpreter(path: Path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    return Interpreter(model_path=str(path))


def case(kind: str, path: Path) -> list[float]:
    import numpy as np

    interpreter = _interpreter(path)
    v = np.arange(4, dtype=np.float32)
    if kind == "signature":
        runner = interpreter.get_signature_runner()
        s_shape = runner.get_input_details()["s"]["shape"]
        y = runner(s=np.full(s_shape, 2.0, np.float32), v=v)["y"]   # shape () or (1,), as the model declares
    else:   # the plain API: resize the scalar input to its own shape []
        index = next(d["index"] for d in interpreter.get_input_details() if len(d["shape"]) == 0)
        interpreter.resize_tensor_input(index, [])
        interpreter.allocate_tensors()
        return []
    return [float(t) for t in y]


def run(folder: Path) -> dict:
    import platform

    results = {"machine": platform.machine()}
    with_versions = "import importlib.metadata as m; print(m.version('ai-edge-litert'), m.version('numpy'))"
    got = subprocess.run([sys.executable, "-c", with_versions], capture_output=True, text=True)
    results["versions (ai-edge-litert, numpy)"] = got.stdout.strip() or got.stderr.strip()[-200:]
    for kind, model in (("signature", "vector"), ("signature", "scalar"), ("resize", "scalar")):
        proc = subprocess.run([sys.executable, "-m", "experiments.bench.arm_scalar_repro", "case", kind,
                               str(folder / f"{model}.tflite")], capture_output=True, text=True)
        results[f"{kind}:{model}"] = {"returncode": proc.returncode,
                                      "output": (proc.stdout.strip() or proc.stderr.strip()[-300:])}
    return results


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        build(Path(argv[1]))
    elif argv[:1] == ["run"]:
        print(json.dumps(run(Path(argv[1])), indent=2))
    elif argv[:1] == ["case"]:
        print(json.dumps(case(argv[1], Path(argv[2]))))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
