"""On-device model runtime: a firmware model in a TFLite interpreter (ai-edge-litert or tflite-runtime 2.14).

Never imports TensorFlow. The training state lives in the interpreter's resource variables; `get_flat`/`set_flat`
move it in and out (wire order = `protocol.weights.flatten`). Training batches have the fixed size in the
manifest (`batch_sizes.train`), a capacity: the caller fills it with a Poisson sample (device.training) and marks
the real rows with `mask`; `train_step` refuses any other size. `infer`/`evaluate` take any number of rows: the
tail batch is zero-padded and its padded rows are dropped.
"""

from __future__ import annotations

import importlib
import os
import secrets

import numpy as np

from protocol.errors import ProtocolError, Reason
from protocol.weights import flatten, layout_from_dicts, layout_size, unflatten

RUNTIMES = {"ai_edge_litert": "ai_edge_litert.interpreter", "tflite_runtime": "tflite_runtime.interpreter"}


def interpreter_class():
    """LiteRT's Interpreter class, else tflite-runtime's; FEDIOMT_RUNTIME=tflite_runtime|ai_edge_litert forces one."""
    forced = os.environ.get("FEDIOMT_RUNTIME")
    if forced and forced not in RUNTIMES:
        raise ValueError(f"FEDIOMT_RUNTIME={forced!r}: expected one of {', '.join(RUNTIMES)}")
    errors = []
    for name in [forced] if forced else list(RUNTIMES):
        try:
            return importlib.import_module(RUNTIMES[name]).Interpreter
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise ImportError("no TFLite interpreter: install ai-edge-litert (or tflite-runtime): " + "; ".join(errors))


def secure_generator() -> np.random.Generator:
    """Gaussian noise source for DP: seeded from the OS CSPRNG, so nobody can predict (and subtract) the noise."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(size, n - start)


def _pad(rows: np.ndarray, size: int) -> np.ndarray:
    if len(rows) == size:
        return rows
    pad = np.zeros((size - len(rows), *rows.shape[1:]), rows.dtype)
    return np.concatenate([rows, pad])


class TrainableModel:
    """A trainable firmware model: DP-SGD steps, weights in/out, inference and evaluation."""

    def __init__(self, model_bytes: bytes, manifest: dict, rng: np.random.Generator | None = None,
                 num_threads: int | None = None) -> None:
        self.manifest = manifest
        self.layout = layout_from_dicts(manifest["layout"])
        self.n_params = layout_size(self.layout)
        self.batch_size = int(manifest["batch_sizes"]["train"])
        self.infer_batch_size = int(manifest["batch_sizes"]["infer"])
        self.input_shape = tuple(manifest["input"]["shape"])
        self.n_classes = int(manifest["n_classes"])
        self.hyperparameters = dict(manifest.get("hyperparameters", {}))
        self.rng = rng or secure_generator()
        self._interpreter = interpreter_class()(model_content=model_bytes, num_threads=num_threads)
        self._runners = {name: self._interpreter.get_signature_runner(name)
                         for name in ("train", "infer", "evaluate", "get_weights", "set_weights")}
        self._zeros = np.zeros(self.n_params, np.float32)
        # the hyperparameters' shapes as the bundle declares them: [1] since issue 22 (older bundles: [], which
        # LiteRT 1.4.0 on aarch64 cannot resize to, docs/litert-aarch64-train-crash.md)
        self._train_shapes = {k: tuple(int(n) for n in d["shape"])
                              for k, d in self._runners["train"].get_input_details().items()}
        got = self._runners["get_weights"]()["weights"].size
        if got != self.n_params:
            raise ProtocolError(Reason.BAD_SHAPE, f"model holds {got} weights, manifest layout {self.n_params}")

    def get_flat(self) -> np.ndarray:
        return np.array(self._runners["get_weights"]()["weights"], np.float32)

    def set_flat(self, vec: np.ndarray) -> None:
        vec = np.asarray(vec, np.float32)
        if vec.shape != (self.n_params,):
            raise ProtocolError(Reason.BAD_SHAPE, f"weight vector of shape {vec.shape}, model has {self.n_params}")
        if not np.all(np.isfinite(vec)):
            raise ProtocolError(Reason.NON_FINITE, "weights contain NaN or Inf")
        self._runners["set_weights"](weights=vec)

    def get_weights(self) -> list[np.ndarray]:
        return [t.copy() for t in unflatten(self.get_flat(), self.layout)]

    def set_weights(self, tensors: list[np.ndarray]) -> None:
        if [tuple(np.shape(t)) for t in tensors] != [s.shape for s in self.layout]:
            raise ProtocolError(Reason.BAD_SHAPE, "tensor shapes do not match the model layout")
        self.set_flat(flatten(tensors))

    def noise_like(self) -> tuple[int]:
        """Shape of the `noise` argument of `train_step` (standard normal, flat in layout order)."""
        return (self.n_params,)

    def _flat_or_zeros(self, vec, what: str) -> np.ndarray:
        if vec is None:
            return self._zeros
        vec = np.asarray(vec, np.float32)
        if vec.shape != (self.n_params,):
            raise ProtocolError(Reason.BAD_SHAPE, f"{what} of shape {vec.shape}, model has {self.n_params}")
        return vec

    def train_step(self, x: np.ndarray, y: np.ndarray, noise: np.ndarray | None, lr: float, clip: float,
                   noise_mult: float, mu: float = 0.0, ref_flat: np.ndarray | None = None,
                   control_flat: np.ndarray | None = None, rng: np.random.Generator | None = None,
                   mask: np.ndarray | None = None, denom: float | None = None, apply: bool = True) -> float:
        """One DP-SGD step (or one chunk of it) on exactly `batch_size` rows; returns the mean loss of the masked
        rows before the step.

        noise None: drawn here from `rng` (default: this model's CSPRNG-seeded generator). `ref_flat` is FedProx's
        reference (global) weights, used when mu > 0; `control_flat` is SCAFFOLD's c - c_i. `mask` (0/1 per row,
        default all 1) selects the rows that count, `denom` divides the clipped sum plus noise (default
        `batch_size`; Poisson sampling passes the expected batch q * n), `apply=False` only adds the rows' clipped
        gradients to the interpreter's accumulator (a Poisson step larger than the capacity, device.training).
        """
        x = np.asarray(x, np.float32)
        if x.shape != (self.batch_size, *self.input_shape) or np.shape(y) != (self.batch_size,):
            raise ProtocolError(Reason.BAD_SHAPE, f"train batch {x.shape}/{np.shape(y)}, model wants "
                                                  f"{(self.batch_size, *self.input_shape)}")
        if noise is None:
            noise = (rng or self.rng).standard_normal(self.n_params, dtype=np.float32) if apply else self._zeros
        if mu > 0 and ref_flat is None:
            raise ValueError("FedProx (mu > 0) needs ref_flat, the reference weights")
        mask = np.ones(self.batch_size, np.float32) if mask is None else np.asarray(mask, np.float32)
        if mask.shape != (self.batch_size,):
            raise ProtocolError(Reason.BAD_SHAPE, f"mask of shape {mask.shape}, model wants ({self.batch_size},)")
        hyper = {"lr": lr, "clip": clip, "noise_mult": noise_mult, "mu": mu, "apply": 1.0 if apply else 0.0,
                 "denom": self.batch_size if denom is None else denom}
        out = self._runners["train"](
            x=x, y=np.asarray(y, np.int32), mask=mask, noise=self._flat_or_zeros(noise, "noise"),
            ref=self._flat_or_zeros(ref_flat, "ref_flat"), control=self._flat_or_zeros(control_flat, "control_flat"),
            **{k: np.full(self._train_shapes[k], v, np.float32) for k, v in hyper.items()})
        return float(out["loss"])

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits for any number of rows."""
        x = np.asarray(x, np.float32)
        out = np.zeros((len(x), self.n_classes), np.float32)
        for start, n in _batches(len(x), self.infer_batch_size):
            logits = self._runners["infer"](x=_pad(x[start:start + n], self.infer_batch_size))["logits"]
            out[start:start + n] = logits[:n]
        return out

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) over all rows."""
        x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
        if len(x) == 0:
            raise ValueError("evaluate needs at least one row")
        loss = correct = 0.0
        for start, n in _batches(len(x), self.batch_size):
            out = self._runners["evaluate"](x=_pad(x[start:start + n], self.batch_size),
                                            y=_pad(y[start:start + n], self.batch_size))
            loss += float(np.sum(out["loss"][:n]))
            correct += float(np.sum(out["correct"][:n]))
        return loss / len(x), correct / len(x)


class Int8Model:
    """An int8 student (full-integer quantised inference model): float in, float logits out."""

    def __init__(self, model_bytes: bytes, num_threads: int | None = None) -> None:
        self._interpreter = interpreter_class()(model_content=model_bytes, num_threads=num_threads)
        self._runner = self._interpreter.get_signature_runner("serving_default")
        self._in = self._runner.get_input_details()["x"]
        self._out = next(iter(self._runner.get_output_details().values()))

    def infer(self, x: np.ndarray) -> np.ndarray:
        scale, zero = self._in["quantization_parameters"]["scales"][0], self._in["quantization_parameters"][
            "zero_points"][0]
        q = np.clip(np.round(np.asarray(x, np.float32) / scale + zero), -128, 127).astype(np.int8)
        out = next(iter(self._runner(x=q).values()))
        o_scale = self._out["quantization_parameters"]["scales"][0]
        o_zero = self._out["quantization_parameters"]["zero_points"][0]
        return (out.astype(np.float32) - o_zero) * o_scale
