"""TFLite conversion and the TFLite interpreter behind one ``logits`` call: what edge export, serving and
quantization-aware training share (a layer below ``registry`` so that training steps can use it too)."""

from __future__ import annotations

import os
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from pipelines.config import Config, PipelineError
from pipelines.log import logger
from pipelines.models.builders import FakeQuant, build_student, layer_inputs
from pipelines.models.distiller import Distiller
from pipelines.training.fit import class_weights, fit, make_dataset

# Images an INT8 conversion or a QAT model's ranges are calibrated on: TFLite's own guidance is 100 to 500.
REPRESENTATIVE_IMAGES = 200


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


# Fine-tuning a trained student with fake quantization: a fifth of its epochs (at least one) at a tenth of its
# learning rate; the full rate would undo much of the training it starts from.
QAT_EPOCH_FRACTION, QAT_LEARNING_RATE_FACTOR = 0.2, 0.1


def student_spec(student: keras.Model) -> tuple[str, int, int]:
    """(``WIDTHxDEPTH``, image size, classes) of a model :func:`pipelines.models.builders.build_student` built."""
    size = student.name.removeprefix("student_").removesuffix("_qat")
    units = student.output_shape[-1]
    return size, student.input_shape[1], 2 if units == 1 else units


def fold_batch_norm(student: keras.Model) -> keras.Model:
    """The student without normalisation layers: each BatchNorm folded into the convolution before it (kernel scaled
    per output channel by gamma / sqrt(variance + epsilon), bias beta - mean * that scale); the same function in
    inference mode. A student without normalisation is returned as it is; GroupNorm depends on the image and cannot fold."""
    norms = [layer for layer in student.layers if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.GroupNormalization))]
    if not norms:
        return student
    if any(isinstance(layer, keras.layers.GroupNormalization) for layer in norms):
        raise PipelineError(
            f"{student.name}: GroupNorm normalises each image by its own statistics and cannot be folded; use student_norm=batch"
        )
    size, image_size, num_classes = student_spec(student)
    folded = build_student(size, image_size, num_classes, norm="none")
    for layer in folded.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel = student.get_layer(layer.name).get_weights()[0]
            norm = student.get_layer(layer.name.replace("_conv", "_norm"))
            gamma, beta, mean, variance = (np.asarray(weight) for weight in norm.get_weights())
            scale = gamma / np.sqrt(variance + norm.epsilon)
            layer.set_weights([kernel * scale, beta - mean * scale])
        elif layer.get_weights():
            layer.set_weights(student.get_layer(layer.name).get_weights())
    return folded


def qat_model(student: keras.Model, representative: np.ndarray) -> keras.Model:
    """The quantization-aware copy of a trained BatchNorm (or normalisation-free) student: its folded weights in
    :func:`build_student`'s quantized form, every activation range set to the range its tensor spans on
    ``representative`` (layer by layer, so each sees the quantization before it). The student is left as it is."""
    folded = fold_batch_norm(student)
    size, image_size, num_classes = student_spec(student)
    qat = build_student(size, image_size, num_classes, norm="none", quantized=True)
    for layer in qat.layers:
        if isinstance(layer, FakeQuant):
            low, high = np.inf, -np.inf
            for values in layer_inputs(qat, layer, representative):
                low, high = min(low, float(values.min())), max(high, float(values.max()))
            # The range holds 0, which int8 must represent exactly (padding, ReLU).
            layer.set_weights([np.float32(min(low, 0.0)), np.float32(max(high, 0.0, low + 1e-6))])
        elif layer.get_weights():
            layer.set_weights(folded.get_layer(layer.name).get_weights())
    return qat


def fine_tune_qat(
    student: keras.Model,
    cfg: Config,
    images: np.ndarray,
    labels: np.ndarray,
    teacher_logits: np.ndarray | None = None,
    teacher: keras.Model | None = None,
    prefix: str = "qat_",
    describe: str = "QAT",
) -> keras.Model:
    """Quantization-aware training: :func:`qat_model` of a trained student, calibrated on ``images``, fine-tuned on them
    under the student's own loss (the Distiller's KD loss with ``cfg``'s temperature and alpha, the teacher's cached
    ``teacher_logits`` of these images or an online ``teacher``; hard labels alone without either, class-weighted),
    for ``QAT_EPOCH_FRACTION`` of ``cfg.epochs`` at ``QAT_LEARNING_RATE_FACTOR`` times its learning rate.

    Float32 whatever ``cfg.precision`` says: TensorFlow's fake quantization is float32 only. Returns the QAT model;
    :func:`int8_export` turns it into TFLite with the ranges it learnt."""
    size, _, num_classes = student_spec(student)
    qat = qat_model(student, representative_images(images))
    alpha = cfg.effective_alpha if teacher_logits is not None or teacher is not None else 1.0
    trainer = Distiller(qat, teacher, cfg.temperature, alpha, num_classes == 2)
    weights = class_weights(labels, num_classes)[labels]
    train = make_dataset(images, labels, weights, teacher_logits, cfg.batch_size, shuffle=True, seed=cfg.seed)
    epochs = max(1, round(cfg.epochs * QAT_EPOCH_FRACTION))
    logger().info(f"{describe}: quantization-aware fine-tuning of student {size} for {epochs} epoch(s)")
    fit(
        trainer,
        train,
        None,
        cfg,
        prefix=prefix,
        describe=describe,
        epochs=epochs,
        learning_rate=cfg.learning_rate * QAT_LEARNING_RATE_FACTOR,
    )
    return qat


def representative_images(images: np.ndarray) -> np.ndarray:
    """At most ``REPRESENTATIVE_IMAGES`` of ``images``, evenly spaced: what INT8 calibration reads."""
    return images[:: max(1, -(-len(images) // REPRESENTATIVE_IMAGES))]


def int8_export(model: keras.Model, representative: np.ndarray) -> bytes:
    """Full-integer TFLite (int8 in and out) of a float student (post-training quantization, ranges calibrated on
    ``representative``) or of a :func:`fine_tune_qat` model (the ranges it learnt; the converter reads its fake
    quantization ops as the tensors' scales)."""
    return to_tflite(model, representative_images(representative))


def float_ops(flatbuffer: bytes) -> list[str]:
    """The operators of a TFLite model that read or write a float32 tensor (``QUANTIZE``/``DEQUANTIZE`` included):
    none in an all-integer graph; GroupNorm's statistics, which have no int8 kernel, hop back to float."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the deprecation notice, as in TFLiteModel
        interpreter = tf.lite.Interpreter(
            model_content=flatbuffer, experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    dtypes = {tensor["index"]: tensor["dtype"] for tensor in interpreter.get_tensor_details()}
    return [
        op["op_name"]
        for op in interpreter._get_ops_details()
        if any(dtypes[index] == np.float32 for index in (*op["inputs"], *op["outputs"]) if index >= 0)
    ]
