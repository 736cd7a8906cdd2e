"""Regenerate firmware_models/prebuilt/: the bundles the tflite-runtime 2.14 tests load (that venv has no TF).

    python -m firmware_models.devbundles

Signed with DEVELOPMENT_ONLY_signing.key, committed on purpose for tests: never trust it on a real device.
Also writes har_mlp_dynamic_range.tflite, a dynamic-range-quantised model that tflite-runtime 2.14 must refuse
(FULLY_CONNECTED v12), which is why students are full-int8 only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PREBUILT = Path(__file__).resolve().parent / "prebuilt"
DEV_KEY = PREBUILT / "DEVELOPMENT_ONLY_signing.key"
DEV_PUBKEY = PREBUILT / "DEVELOPMENT_ONLY_signing.key.pub"
TRAINABLE = ("wearable_cnn", "har_mlp", "vitals_mlp")
STUDENT = "har_mlp_int8"
DYNAMIC_RANGE = "har_mlp_dynamic_range.tflite"


def calibration_rows(n_features: int, rows: int = 200) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(rows, n_features)).astype(np.float32)


def dynamic_range_tflite(name: str) -> bytes:
    import tensorflow as tf

    from firmware_models.models import forward, model_spec

    spec = model_spec(name)
    consts = [tf.constant(w) for w in spec.init_weights(0)]

    @tf.function(input_signature=[tf.TensorSpec([1, *spec.input_shape], tf.float32, name="x")])
    def infer(x):
        return {"logits": forward(spec, consts, x)[0]}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([infer.get_concrete_function()])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from firmware_models.build import build_bundle, build_student_bundle
    from firmware_models.cli import signing_key
    from firmware_models.models import model_spec
    from protocol.atomic import atomic_write

    key = signing_key(DEV_KEY)
    for name in TRAINABLE:
        build_bundle(name, PREBUILT / name, key)
    spec = model_spec("har_mlp")
    build_student_bundle("har_mlp", PREBUILT / STUDENT, key, spec.init_weights(0),
                         calibration_rows(spec.input_shape[0]))
    atomic_write(PREBUILT / DYNAMIC_RANGE, dynamic_range_tflite("har_mlp"))


if __name__ == "__main__":
    main()
