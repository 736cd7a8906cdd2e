"""TF -> TFLite: the trainable fp32 model (builtin ops + resource variables) and full-int8 inference students.

Neither tflite-runtime 2.14 nor ai-edge-litert has the Flex delegate, so both conversions allow TFLITE_BUILTINS
only; dynamic-range quantisation is never used (its FULLY_CONNECTED v12 does not load in tflite-runtime 2.14).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable

import numpy as np
import tensorflow as tf

from firmware_models.models import SIGNATURES, FirmwareModule, ModelSpec, forward


def trainable_tflite(module: FirmwareModule) -> bytes:
    with tempfile.TemporaryDirectory(prefix="fediomt-savedmodel-") as tmp:
        tf.saved_model.save(module, tmp, signatures=module.signatures())
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(SIGNATURES))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        return converter.convert()


def int8_tflite(spec: ModelSpec, weights: list[np.ndarray], representative: np.ndarray,
                calibration_rows: int = 200) -> bytes:
    """Full-integer post-training quantisation (int8 in/out) of the inference forward pass with `weights` frozen.

    `representative` is a few hundred real input rows (calibration of activation ranges). Batch size is dynamic.
    """
    consts = [tf.constant(np.asarray(w, np.float32)) for w in weights]

    @tf.function(input_signature=[tf.TensorSpec([None, *spec.input_shape], tf.float32, name="x")])
    def infer(x):
        return {"logits": forward(spec, consts, x)[0]}

    def calibration() -> Iterable[list[np.ndarray]]:
        rows = np.asarray(representative, np.float32)[:calibration_rows]
        for row in rows:
            yield [row[None]]

    holder = tf.Module()
    holder.infer = infer
    converter = tf.lite.TFLiteConverter.from_concrete_functions([infer.get_concrete_function()], holder)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = calibration
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()
