"""Firmware models: TensorFlow builders of trainable, builtin-only TFLite models with DP-SGD in the graph.

TensorFlow is imported on first use of these names, so `fediomt models list/verify` stay light.
"""

from __future__ import annotations

_EXPORTS = {
    "MODELS": "firmware_models.models",
    "model_spec": "firmware_models.models",
    "keras_model": "firmware_models.models",
    "build_bundle": "firmware_models.build",
    "build_student_bundle": "firmware_models.build",
    "build_trainable": "firmware_models.build",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'firmware_models' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
