"""TFLite conversion and the TFLite interpreter behind one ``logits`` call: what edge export, serving and
quantization-aware training share (a layer below ``registry`` so that training steps can use it too)."""

from __future__ import annotations

import os
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf


def to_tflite(model: keras.Model, representative: np.ndarray | None = None) -> bytes:
    """The model as a TFLite flatbuffer for one image at a time: float32, or full INT8 given a representative set."""
    # Through a SavedModel: the converter then sees frozen weights, not resource variables.
    with tempfile.TemporaryDirectory() as tmp:
        model.export(tmp, format="tf_saved_model", input_signature=[tf.TensorSpec((1, *model.input_shape[1:]), tf.float32)], verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        if representative is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in representative)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        return converter.convert()


class TFLiteModel:
    """One TFLite flatbuffer behind ``logits(images)``: quantizes inputs and dequantizes outputs where INT8.

    An interpreter is not thread-safe: one instance per thread (the served model keeps one per request thread);
    ``num_threads``: its kernels' threads (default: every CPU).
    """

    def __init__(self, flatbuffer: bytes, num_threads: int | None = None):
        with warnings.catch_warnings():
            # tf.lite.Interpreter is marked deprecated in favour of the separate ai-edge-litert package; it is
            # still TensorFlow's own runtime for the flatbuffers it converts, and one dependency fewer.
            warnings.simplefilter("ignore", UserWarning)
            self.interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=num_threads or os.cpu_count())
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def logit(self, image: np.ndarray) -> np.ndarray:
        """Logits of one preprocessed image ``(S, S, 1)``."""
        scale, zero = self.input["quantization"]
        batch = image[None].astype(np.float32)
        if self.input["dtype"] == np.int8:
            batch = np.clip(np.round(batch / scale + zero), -128, 127).astype(np.int8)
        self.interpreter.set_tensor(self.input["index"], batch)
        self.interpreter.invoke()
        raw = self.interpreter.get_tensor(self.output["index"])[0]
        if self.output["dtype"] == np.int8:
            out_scale, out_zero = self.output["quantization"]
            return (raw.astype(np.float32) - out_zero) * out_scale
        return raw.astype(np.float32)

    def logits(self, images: np.ndarray) -> np.ndarray:
        return np.stack([self.logit(image) for image in images])
