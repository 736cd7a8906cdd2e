"""Trainable firmware models for the simulator, built once per (model, batch, options) and cached on disk.

Building a model means a TensorFlow conversion (seconds); every simulated device then shares ONE interpreter per
model and swaps its state in and out with set_flat/get_flat (the training state is the flat weight vector).
The cache is keyed by the TensorFlow version and the builder's own source (every firmware_models/*.py), so a change
to a graph never reuses stale bytes, released or not.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from protocol.atomic import atomic_write


def cache_dir() -> Path:
    """$FEDIOMT_MODEL_CACHE, else ~/.cache/fediomt/models."""
    return Path(os.environ.get("FEDIOMT_MODEL_CACHE") or Path.home() / ".cache" / "fediomt" / "models")


@lru_cache(maxsize=1)
def builder_digest() -> str:
    """sha256 of the model builder's source files: what the built bytes depend on besides TensorFlow."""
    import firmware_models

    digest = hashlib.sha256()
    for path in sorted(Path(firmware_models.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@lru_cache(maxsize=16)
def _trainable(name: str, batch_size: int, options: tuple) -> tuple[bytes, dict]:
    import tensorflow as tf

    from firmware_models import build_trainable

    key = json.dumps([name, batch_size, options, builder_digest(), tf.__version__]).encode()
    stem = cache_dir() / hashlib.sha256(key).hexdigest()[:24]
    model_path, manifest_path = stem.with_suffix(".tflite"), stem.with_suffix(".json")
    if model_path.is_file() and manifest_path.is_file():
        return model_path.read_bytes(), json.loads(manifest_path.read_text())
    model, manifest = build_trainable(name, batch_size=batch_size, infer_batch_size=256, **dict(options))
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(model_path, model)
    atomic_write(manifest_path, json.dumps(manifest).encode())
    return model, manifest


def trainable(name: str, batch_size: int, **options) -> tuple[bytes, dict]:
    """(model bytes, manifest) of firmware model `name` with train batch `batch_size`."""
    return _trainable(name, int(batch_size), tuple(sorted(options.items())))


def initial_weights(name: str, seed: int, **options):
    """The flat initial weights of model `name` for this seed (the same initialiser as the built model's)."""
    from firmware_models import model_spec
    from protocol.weights import flatten

    return flatten(model_spec(name, **options).init_weights(seed))
