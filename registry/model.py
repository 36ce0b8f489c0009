"""The served model: the Keras student plus the preprocessing and class names it was trained with.

Input: a DataFrame column ``image`` of base64-encoded files (a browser's data URI ``data:image/jpeg;base64,...``
too), or an array batch of preprocessed images
``(N, S, S, 1)``. The files are read by content (``pipelines.data.images.decode_bytes``), as every source the loader
reads: a picture (JPEG, PNG, TIFF, ... any size or mode), a BraTS ``.h5`` slice (the channel the model was trained on,
from its ``metadata.json``; only models trained on BraTS data know one), or a NIfTI file, plain or gzipped, holding
one 2-D slice (``pipelines.data.images.request_bytes`` gives it for a row of a NIfTI data set). Output: one row per
image with ``label`` and ``prob_<class>`` for each class: calibrated probabilities, the softmax (sigmoid for two
classes) of the logits divided by the ``temperature`` of ``metadata.json`` (1 = as trained), in every serving format.
Bad input raises ``MlflowException`` with INVALID_PARAMETER_VALUE, which ``mlflow models serve`` answers with HTTP
400.

The network runs in the format ``serving_format`` of ``metadata.json`` (promote chooses it): ``keras`` (the
.keras student as one ``tf.function`` with a fixed input signature, traced once), or ``tflite-float32`` /
``tflite-int8`` (the TFLite flatbuffer logged beside it, one interpreter per request thread). Every format
answers the same JSON. Thread pools are sized so that the server's worker processes share the cores instead of
each claiming all of them (:func:`serving_threads`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

# A scan is a few MB at most; anything far larger is refused before decoding.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_BATCH = 256
# What FileReader.readAsDataURL and canvas.toDataURL put before the base64 (RFC 2397): media type and parameters optional.
DATA_URI_PREFIX = re.compile(rb"data:(?:[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[^;,\s]*)*;base64,", re.IGNORECASE)
# How the network runs: the pyfunc artifact that holds each format (``keras`` is the .keras student, always logged).
FORMAT_ARTIFACTS = {"keras": "student", "tflite-float32": "tflite-float32", "tflite-int8": "tflite-int8"}


def server_workers() -> int:
    """Worker processes of the server this process belongs to (1 outside one).

    ``mlflow models serve --workers N`` (or ``MLFLOW_MODELS_WORKERS=N``) starts ``uvicorn --workers N``, which loads
    the model in itself (N = 1) or in N child processes; uvicorn also reads ``WEB_CONCURRENCY``.
    """
    for name in ("MLFLOW_MODELS_WORKERS", "WEB_CONCURRENCY"):
        if os.environ.get(name, "").strip().isdigit():
            return max(1, int(os.environ[name]))
    for pid in ("self", str(os.getppid())):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # not Linux, or the parent is gone
            continue
        if any(arg.endswith(b"uvicorn") for arg in args) and b"--workers" in args[:-1]:
            count = args[args.index(b"--workers") + 1]
            return max(1, int(count)) if count.isdigit() else 1
    return 1


def serving_threads() -> int:
    """Threads one worker's network may use: the cores this process may run on, shared by the server's workers
    (TensorFlow and the interpreter otherwise each claim every core, and N workers fight over them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // server_workers())


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_base64(value: str | bytes) -> bytes:
    """The file in a base64 string or a base64 data URI; binascii.Error/ValueError when it is neither."""
    raw = value.encode("ascii") if isinstance(value, str) else value  # non-ASCII text: ValueError
    prefix = DATA_URI_PREFIX.match(raw)
    return base64.b64decode(raw[prefix.end() :] if prefix else raw, validate=True)


class StudentClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper; artifacts ``student`` (a .keras file), ``metadata`` (JSON: image_size, class_names,
    serving_format, temperature) and, where logged, the TFLite flatbuffers ``tflite-float32`` and ``tflite-int8``."""

    def load_context(self, context) -> None:
        metadata = json.loads(Path(context.artifacts["metadata"]).read_text())
        self.image_size = int(metadata["image_size"])
        self.class_names = list(metadata["class_names"])
        from pipelines.config import BRATS_MODALITIES

        # The BraTS channel an .h5 slice is read from; models trained on pictures have none (and refuse .h5).
        self.modality = BRATS_MODALITIES.index(metadata["modality"]) if metadata.get("modality") else None
        # Every format's logits are divided by the temperature promote fitted (registry.calibrate), so every format returns
        # calibrated probabilities; the arg-max, and so the label, is the same. Versions logged before it existed: 1.
        self.temperature = float(metadata.get("temperature") or 1.0)
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise MlflowException(
                f"temperature {self.temperature!r} in metadata.json: it must be positive; re-log the model", error_code=INTERNAL_ERROR
            )
        # Versions logged before the choice existed serve their Keras student.
        self.serving_format = metadata.get("serving_format") or "keras"
        artifact = FORMAT_ARTIFACTS.get(self.serving_format)
        if artifact is None or artifact not in context.artifacts:
            raise MlflowException(
                f"serving_format {self.serving_format!r} in metadata.json, but the model holds {sorted(context.artifacts)}; re-log it",
                error_code=INTERNAL_ERROR,
            )
        self.threads = serving_threads()
        if self.serving_format == "keras":
            self._logits = self._keras_forward(context.artifacts["student"])
        else:
            self._flatbuffer = Path(context.artifacts[artifact]).read_bytes()
            self._interpreters = threading.local()
            self._logits = self._tflite_logits
            self._tflite_logits(np.zeros((1, self.image_size, self.image_size, 1), np.float32))  # a broken file fails the load

    def _keras_forward(self, path: str):
        """The student's forward pass as one graph for any batch size: traced once at load, never again per request
        (eager calls cost 29 ms for one image where the graph costs 4; ``predict`` 95 ms)."""
        import tensorflow as tf

        from pipelines.models.builders import load_keras_model

        try:
            tf.config.threading.set_intra_op_parallelism_threads(self.threads)
            tf.config.threading.set_inter_op_parallelism_threads(self.threads)
        except RuntimeError:  # TensorFlow already ran in this process (another model loaded first): its pools stay
            pass
        model = load_keras_model(path)
        forward = tf.function(
            lambda x: model(x, training=False), input_signature=[tf.TensorSpec((None, self.image_size, self.image_size, 1), tf.float32)]
        )
        forward(tf.zeros((1, self.image_size, self.image_size, 1)))  # trace now, not on the first request
        return lambda images: forward(tf.constant(images)).numpy()

    def _tflite_logits(self, images: np.ndarray) -> np.ndarray:
        """Logits through this thread's interpreter (an interpreter is not thread-safe; the server answers requests
        from a pool of threads)."""
        from pipelines.training.quantize import TFLiteModel

        model = getattr(self._interpreters, "model", None)
        if model is None:
            model = self._interpreters.model = TFLiteModel(self._flatbuffer, num_threads=self.threads)
        return model.logits(images)

    def _images_from_frame(self, frame: pd.DataFrame) -> np.ndarray:
        from pipelines.config import PipelineError
        from pipelines.data.images import decode_bytes, preprocess

        if "image" not in frame.columns:
            raise bad_request(f"expected a column 'image' of base64-encoded image files; got columns {list(frame.columns)}")
        images = []
        for row, value in enumerate(frame["image"]):
            if not isinstance(value, (str, bytes)) or not value:
                raise bad_request(f"row {row}: 'image' must be a non-empty base64 string, got {type(value).__name__}")
            if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:
                raise bad_request(f"row {row}: image larger than {MAX_IMAGE_BYTES // 2**20} MB")
            try:
                payload = decode_base64(value)
            except (binascii.Error, ValueError):
                raise bad_request(f"row {row}: 'image' is not valid base64 (nor a data:...;base64, URI)") from None
            try:
                pixels = decode_bytes(payload, name=f"row {row}", modality=self.modality, image_size=self.image_size)
                images.append(preprocess(pixels, self.image_size))
            except PipelineError as error:
                raise bad_request(str(error) if str(error).startswith("row ") else f"row {row}: {error}") from None
        return np.stack(images)

    def _images_from_array(self, array: np.ndarray) -> np.ndarray:
        expected = (self.image_size, self.image_size, 1)
        if array.ndim != 4 or array.shape[1:] != expected:
            raise bad_request(
                f"an array batch must have shape (N, {self.image_size}, {self.image_size}, 1) of preprocessed images; got {array.shape}"
            )
        # Real numbers only: complex values would lose their imaginary part, timedeltas their unit.
        if array.dtype.kind not in "iuf":  # signed, unsigned, float (numpy files timedelta64 under integers)
            raise bad_request(f"an array batch must be numeric: real integers or floats; got dtype {array.dtype}")
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            raise bad_request("the array batch has NaN or infinite values (or values beyond float32's range)")
        # Each preprocessed image is z-scored over S*S pixels, so no value can exceed sqrt(S*S - 1) < S;
        # larger values are not preprocessed images (and near float32's limit they overflow the network).
        if np.abs(array).max() > self.image_size:
            raise bad_request(
                f"array values up to {np.abs(array).max():.3g} in magnitude: preprocessed images are z-scored and stay within "
                f"±{self.image_size}; send the image files instead"
            )
        return array

    # pd.DataFrame: a type hint MLflow takes without inferring a schema (the signature is logged explicitly) or
    # converting the input, so array batches still arrive as arrays; without one MLflow warns at every load.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = np.asarray(model_input)
            if model_input.ndim == 0:
                raise bad_request(
                    f"expected a DataFrame with an 'image' column or an array batch (N, {self.image_size}, {self.image_size}, 1); got a "
                    f"single {model_input.dtype} value"
                )
        # Size checks first: nothing is decoded for a request that will be refused anyway.
        if len(model_input) == 0:
            raise bad_request("empty batch: send at least one image")
        if len(model_input) > MAX_BATCH:
            raise bad_request(f"batch of {len(model_input)} images; send at most {MAX_BATCH} per request")
        images = self._images_from_frame(model_input) if isinstance(model_input, pd.DataFrame) else self._images_from_array(model_input)
        from pipelines.evaluation.metrics import probabilities

        logits = self._logits(images.astype(np.float32, copy=False)) / np.float32(self.temperature)
        probs = probabilities(logits, len(self.class_names) == 2)
        if not np.all(np.isfinite(probs)):
            # Inputs are checked above, so this is the model's fault: an error (HTTP 500), never a NaN answer.
            raise MlflowException(
                "the model produced non-finite probabilities for valid input; the registered model is broken, roll back",
                error_code=INTERNAL_ERROR,
            )
        # One constructor call: inserting the label column afterwards cost a millisecond per request.
        labels = np.asarray(self.class_names, dtype=object)[probs.argmax(axis=1)]
        return pd.DataFrame({"label": labels, **{f"prob_{name}": probs[:, i] for i, name in enumerate(self.class_names)}})


# Recorded in the logged model's MLmodel file (``metadata``) beside the signature, whose schema cannot say it.
INPUTS = (
    "column 'image': base64 of one file per row: a picture (JPEG, PNG, TIFF, ...), a BraTS .h5 slice (models trained on BraTS: "
    "the channel in 'modality') or a NIfTI file (.nii or .nii.gz) holding one 2-D slice; or an array (N, S, S, 1) of preprocessed images"
)


def signature(class_names: list[str]) -> ModelSignature:
    outputs = Schema([ColSpec("string", "label")] + [ColSpec("double", f"prob_{name}") for name in class_names])
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]), outputs=outputs)


def encode_file(path: Path | str) -> str:
    """A file, or a manifest row (a NIfTI slice ``<volume>#z=<k>`` included), as the base64 string the served model takes."""
    from pipelines.data.images import request_bytes

    return base64.b64encode(request_bytes(path)).decode("ascii")
