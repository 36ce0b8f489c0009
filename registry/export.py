"""Edge export: a registered student as TFLite float32 and full-integer INT8, logged to the version's run.

INT8 is post-training quantization: weights and activations in int8, calibrated on a representative set
of training images (never hold-out images), with int8 input and output tensors so the whole graph runs
on integer kernels. Beside the Keras student, each format's batch-1 CPU latency (p50, p95), file size
and hold-out metrics are logged as ``edge_<format>_<what>`` metrics, and the files as ``edge/*.tflite``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow import MlflowClient

from pipelines.config import Config, PipelineError
from pipelines.evaluation.latency import REPEATS, keras_latency, latency_percentiles
from pipelines.evaluation.metrics import classification_metrics, model_logits, probabilities
from pipelines.log import logger
from pipelines.models.builders import load_keras_model
from pipelines.names import VersionTag
from pipelines.steps.prepare import Prepared, prepare_data
from pipelines.training.quantize import TFLiteModel, int8_export, to_tflite
from registry.fetch import resolve_version

# serving format -> its edge_<name>_* metrics and file; int8 is post-training quantized here, int8_qat the quantization-aware
# export a version promoted with qat=true carries (and serves as tflite-int8).
EDGE_NAMES = {"tflite-float32": "float32", "tflite-int8": "int8", "tflite-int8-qat": "int8_qat"}


@dataclass(frozen=True)
class EdgeExport:
    version: str
    run_id: str
    files: dict[str, Path]  # float32 / int8 -> .tflite path (inside the work folder given to export_edge)
    results: dict[str, dict[str, float]]  # format -> size_bytes, p50_ms, p95_ms, f1, roc_auc, ...


def load_student(name: str, version: str) -> keras.Model:
    """The Keras student inside a registered pyfunc version."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_keras_model(version_file(name, version, "student.keras", Path(tmp)))


def version_bytes(name: str, version: str, file_name: str) -> bytes:
    """The content of one file of a registered pyfunc version (``student_int8.tflite``)."""
    with tempfile.TemporaryDirectory() as tmp:
        return version_file(name, version, file_name, Path(tmp)).read_bytes()


def version_file(name: str, version: str, file_name: str, into: Path) -> Path:
    """One file of a registered pyfunc version (``student.keras``, ``student_int8.tflite``), downloaded into ``into``."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(into)))
    found = sorted(local.rglob(file_name))
    if not found:
        raise PipelineError(f"{name} v{version} holds no {file_name}; it was not logged by promote")
    return found[0]


def tflite_exports(student: keras.Model, prepared: Prepared, qat_student: keras.Model | None = None) -> dict[str, bytes]:
    """The student's TFLite flatbuffers by serving format: float32, and INT8: of the quantization-aware copy with the ranges
    it learnt when there is one (``qat=true``), else post-training quantized. Calibration reads training images only."""
    training_images = prepared.images[prepared.splits.train]
    return {"tflite-float32": to_tflite(student), "tflite-int8": int8_export(qat_student or student, training_images)}


def format_results(
    student: keras.Model, exports: dict[str, bytes], prepared: Prepared, repeats: int = REPEATS
) -> dict[str, dict[str, float]]:
    """Batch-1 latency (p50, p95) and hold-out metrics of the Keras student (``keras``) and of each flatbuffer."""
    test = prepared.splits.test
    labels, images, binary = prepared.dataset.labels[test], prepared.images[test], prepared.dataset.binary
    results = {
        "keras": {
            **keras_latency(student, images, 1, repeats),
            **classification_metrics(labels, probabilities(model_logits(student, images), binary)),
        }
    }
    for name, flatbuffer in exports.items():
        tflite = TFLiteModel(flatbuffer)
        results[name] = {
            "size_bytes": float(len(flatbuffer)),
            **latency_percentiles(lambda m=tflite: m.logit(images[0]), repeats),
            **classification_metrics(labels, probabilities(tflite.logits(images), binary)),
        }
    return results


def compare_formats(
    student: keras.Model, prepared: Prepared, out_dir: Path, repeats: int = REPEATS, qat_int8: bytes | None = None
) -> tuple[dict[str, Path], dict[str, dict[str, float]]]:
    """Convert the student, then time batch-1 inference and score the hold-out split for Keras, float32 and INT8
    (post-training), and the quantization-aware INT8 export ``qat_int8`` when given."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keras_path = out_dir / "student.keras"
    student.save(keras_path)
    exports = tflite_exports(student, prepared)
    if qat_int8 is not None:
        exports["tflite-int8-qat"] = qat_int8
    files = {}
    for serving_format, flatbuffer in exports.items():
        edge_name = EDGE_NAMES[serving_format]
        files[edge_name] = out_dir / f"student_{edge_name}.tflite"
        files[edge_name].write_bytes(flatbuffer)
    results = format_results(student, exports, prepared, repeats)
    results["keras"]["size_bytes"] = float(keras_path.stat().st_size)
    return files, {EDGE_NAMES.get(name, name): values for name, values in results.items()}


def export_edge(cfg: Config, version: str | None = None, out_dir: Path | None = None, repeats: int = REPEATS) -> EdgeExport:
    """Export ``cfg.model_name`` (the given version, else the champion) to TFLite and log files and metrics to its run.

    ``cfg`` names the data the model was trained on (its digest must match the version's); the representative
    set comes from its training split, the scores from its hold-out split.
    """
    model_version = (
        resolve_version(cfg.model_name, alias="champion") if version is None else MlflowClient().get_model_version(cfg.model_name, version)
    )
    prepared = prepare_data(cfg.replace(image_size=int(model_version.tags.get(VersionTag.IMAGE_SIZE, cfg.image_size))))
    trained_on = model_version.tags.get(VersionTag.DATA_DIGEST)
    if trained_on and trained_on != prepared.dataset.digest:
        raise PipelineError(
            f"data at {cfg.data_dir or 'the embedded set'} (digest {prepared.dataset.digest[:12]}) is not the data "
            f"{cfg.model_name} v{model_version.version} was trained on (digest {trained_on[:12]}); pass that data_dir"
        )
    student = load_student(cfg.model_name, model_version.version)
    qat = model_version.tags.get(VersionTag.INT8) == "quantization-aware"
    qat_int8 = version_bytes(cfg.model_name, model_version.version, "student_int8.tflite") if qat else None
    target = out_dir or Path(tempfile.mkdtemp(prefix="kd-edge-"))
    files, results = compare_formats(student, prepared, target, repeats, qat_int8)
    client = MlflowClient()
    for path in files.values():
        client.log_artifact(model_version.run_id, str(path), "edge")
    client.log_batch(
        model_version.run_id,
        metrics=[
            mlflow.entities.Metric(f"edge_{fmt}_{what}", value, int(time.time() * 1000), 0)
            for fmt, values in results.items()
            for what, value in values.items()
            if np.isfinite(value)
        ],
    )
    for fmt, r in results.items():
        logger("edge").info(
            f"{fmt:<8} {r['size_bytes'] / 1024:8.1f} KiB  batch-1 p50 {r['p50_ms']:.3f} ms  p95 {r['p95_ms']:.3f} ms  "
            f"hold-out F1 {r['f1']:.4f}"
        )
    logger("edge").info(
        f"logged {', '.join(p.name for p in files.values())} to run {model_version.run_id} ({cfg.model_name} v{model_version.version})"
    )
    return EdgeExport(model_version.version, model_version.run_id, files, results)
