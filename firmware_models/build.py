"""Build signed bundles: the trainable fp32 model of a firmware model, or an int8 student from given weights."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import tensorflow as tf
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.runtime import interpreter_class
from firmware_models.convert import int8_tflite, trainable_tflite
from firmware_models.models import DEFAULT_HYPERPARAMETERS, FirmwareModule, ModelSpec, model_spec
from protocol import __version__
from protocol.bundle import write_bundle
from protocol.topics import check_class
from protocol.weights import layout_to_dicts

DEFAULT_BATCH = 32


def signature_details(model_bytes: bytes) -> dict:
    """{signature: {"inputs"|"outputs": {name: {"shape", "dtype"}}}} as the interpreter sees them."""
    interpreter = interpreter_class()(model_content=model_bytes)
    out = {}
    for name in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(name)
        out[name] = {
            side: {k: {"shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name}
                   for k, d in sorted(details.items())}
            for side, details in (("inputs", runner.get_input_details()), ("outputs", runner.get_output_details()))
        }
    return out


def base_manifest(spec: ModelSpec, kind: str, version: int, model_bytes: bytes) -> dict:
    return {
        "name": spec.name,
        "version": int(version),
        "kind": kind,
        "family": spec.family,
        "device_class": check_class(spec.device_class),
        "options": spec.options,
        "input": {"shape": list(spec.input_shape), "dtype": "float32"},
        "n_classes": spec.n_classes,
        "layout": layout_to_dicts(spec.layout),
        "n_params": sum(s.size for s in spec.layout),
        "signatures": signature_details(model_bytes),
        "build": {"fediomt": __version__, "tensorflow": tf.__version__, "python": platform.python_version(),
                  "ops": "TFLITE_BUILTINS only" if kind == "trainable" else "TFLITE_BUILTINS_INT8"},
    }


def build_trainable(name: str, version: int = 1, batch_size: int = DEFAULT_BATCH,
                    infer_batch_size: int = DEFAULT_BATCH, seed: int = 0, **options) -> tuple[bytes, dict]:
    """(model bytes, unsigned manifest) of a trainable firmware model; deterministic for the same arguments."""
    spec = model_spec(name, **options)
    module = FirmwareModule(spec, batch_size=batch_size, infer_batch_size=infer_batch_size, seed=seed)
    model = trainable_tflite(module)
    manifest = base_manifest(spec, "trainable", version, model)
    manifest["batch_sizes"] = {"train": batch_size, "evaluate": batch_size, "infer": infer_batch_size}
    manifest["hyperparameters"] = dict(DEFAULT_HYPERPARAMETERS)
    manifest["seed"] = seed
    return model, manifest


def build_bundle(name: str, out_dir: str | os.PathLike, private_key: Ed25519PrivateKey, version: int = 1,
                 **options) -> Path:
    """Build, sign and write the trainable bundle of model `name` into `out_dir` (the bundle directory)."""
    model, manifest = build_trainable(name, version=version, **options)
    return write_bundle(out_dir, model, manifest, private_key)


def build_student_bundle(name: str, out_dir: str | os.PathLike, private_key: Ed25519PrivateKey,
                         weights: list[np.ndarray], representative: np.ndarray, version: int = 1,
                         bundle_name: str | None = None, extra: dict | None = None, **options) -> Path:
    """Full-int8 student bundle (int8 in/out, dynamic batch) of `name` with the given weights (layout order).
    `bundle_name` (default: the model's name) is the bundle's name, whose versions devices order; the
    architecture stays in `model` and `options`; `extra` adds manifest keys (e.g. teacher_version)."""
    spec = model_spec(name, **options)
    model = int8_tflite(spec, weights, representative)
    manifest = base_manifest(spec, "int8_student", version, model)
    manifest["batch_sizes"] = {"infer": 0}  # 0: any batch size
    manifest["model"] = spec.name
    manifest["name"] = bundle_name or spec.name
    manifest.update(extra or {})
    return write_bundle(out_dir, model, manifest, private_key)
