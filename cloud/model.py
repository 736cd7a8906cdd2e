"""The global model on the cloud: a Keras model with the firmware model's architecture and flat weight layout.

TensorFlow is imported on first use only, so `fediomt cloud --help` and the daemon's config checks stay fast.
Held-out evaluation data is an NPZ with `x` (float32, (n, *input_shape)) and `y` (integer labels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from cloud.evaluation import evaluate_logits
from protocol.compression import CompressionSettings, decode_update, encode_update
from protocol.weights import Layout, flatten, layout_size, unflatten


@dataclass(frozen=True)
class EvalData:
    """The held-out set (x, y) each global model is evaluated on."""

    x: np.ndarray
    y: np.ndarray


def load_eval_data(path: str | os.PathLike) -> EvalData:
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data or "y" not in data:
            raise ValueError(f"{path}: an evaluation NPZ needs arrays 'x' and 'y'")
        x, y = np.asarray(data["x"], np.float32), np.asarray(data["y"]).astype(np.int64)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{path}: x has {len(x)} rows and y {len(y)}")
    return EvalData(x, y)


def compress_broadcast(previous: np.ndarray, target: np.ndarray, residual: np.ndarray | None,
                       settings: CompressionSettings) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(payload, published weights, new residual) of a "delta" GlobalModel against `previous`.

    Devices rebuild `previous + decode_update(payload)` in float32 and check its sha256, so the published weights
    are exactly that sum; what compression dropped stays in the residual and is sent with the next version.
    """
    payload, new_residual = encode_update((target - previous).astype(np.float32), settings, residual)
    published = (previous + decode_update(payload, previous.size)).astype(np.float32)
    return payload, published, new_residual


class CloudModel:
    """Model `name` built with `options` (firmware_models); weights move in and out as flat float32 vectors."""

    def __init__(self, name: str, options: dict | None = None, seed: int = 0) -> None:
        from firmware_models import keras_model, model_spec

        self.name, self.options = name, dict(options or {})
        spec = model_spec(name, **self.options)
        self.layout: Layout = spec.layout
        self.n_params = layout_size(self.layout)
        self.input_shape = tuple(spec.input_shape)
        self.initial = flatten(spec.init_weights(seed))
        self.keras = keras_model(name, **self.options)

    def check_layout(self, manifest_layout: Layout) -> None:
        """Refuse a bundle whose manifest layout is not this model's (the flat vectors would be misread)."""
        if list(manifest_layout) != list(self.layout):
            raise ValueError(f"bundle layout differs from model {self.name!r} built with {self.options}")

    def held_out(self, path: str | os.PathLike) -> EvalData:
        """An NPZ of rows for this model (eval_data, the trust gate's root set), refused when its rows do not fit."""
        data = load_eval_data(path)
        if data.x.shape[1:] != self.input_shape:
            raise ValueError(f"{path}: rows of shape {data.x.shape[1:]}, model {self.name!r} takes {self.input_shape}")
        return data

    def logits(self, flat: np.ndarray, x: np.ndarray, batch: int = 1024) -> np.ndarray:
        self.keras.set_weights(unflatten(np.asarray(flat, np.float32), self.layout))
        return np.concatenate([np.asarray(self.keras(x[i:i + batch], training=False))
                               for i in range(0, len(x), batch)])

    def evaluate(self, flat: np.ndarray, data: EvalData) -> tuple[float, float, dict]:
        """(loss, accuracy, binary scores: cloud.evaluation) of weights `flat` on the held-out set."""
        if data.x.shape[1:] != self.input_shape:
            raise ValueError(f"evaluation rows of shape {data.x.shape[1:]}, model input {self.input_shape}")
        return evaluate_logits(self.logits(flat, data.x), data.y)
