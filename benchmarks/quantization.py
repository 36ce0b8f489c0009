"""A truly INT8 student: batch-1 latency and hold-out F1 of one student as Keras, TFLite float32, post-training INT8
(PTQ) and, for a student that folds, quantization-aware INT8 (QAT), with ``student_norm=group`` and ``batch``; and the
k-fold F1 of each normalisation, which says whether BatchNorm (with precise statistics) trains as well as GroupNorm.

The students learn from hard labels (no teacher: training one costs more than everything measured here); QAT fine-tunes
under the same loss. Not yet part of ``make bench``::

    python -m benchmarks.quantization --data_dir ../shared/data/brain-mri-yes-no --image_size 64 --student_size 28x3 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import keras
import mlflow
import numpy as np

from pipelines.config import Config
from pipelines.evaluation.latency import REPEATS, keras_latency, latency_percentiles
from pipelines.evaluation.metrics import classification_metrics, model_logits, probabilities
from pipelines.models.builders import build_student
from pipelines.models.distiller import Distiller
from pipelines.steps.distill import cross_validate_student
from pipelines.steps.prepare import Prepared, prepare_data
from pipelines.training.fit import set_seed, train_on_all_data
from pipelines.training.quantize import TFLiteModel, fine_tune_qat, float_ops, int8_export, to_tflite


def format_results(
    student: keras.Model, prepared: Prepared, qat: keras.Model | None = None, repeats: int = REPEATS
) -> dict[str, dict[str, float]]:
    """Per format (``keras``, ``tflite_float32``, ``ptq_int8``, ``qat_int8``): batch-1 ``p50_ms``/``p95_ms``, hold-out
    ``f1`` and, for TFLite, ``float_ops`` (operators on float32 tensors); INT8 calibrated on the training images."""
    train, test = prepared.splits.train, prepared.splits.test
    images, labels, binary = prepared.images[test], prepared.dataset.labels[test], prepared.dataset.binary
    results = {"keras": {**keras_latency(student, images, 1, repeats), "f1": _f1(model_logits(student, images), labels, binary)}}
    flatbuffers = {"tflite_float32": to_tflite(student), "ptq_int8": int8_export(student, prepared.images[train])}
    if qat is not None:
        results["qat_keras"] = {"f1": _f1(model_logits(qat, images), labels, binary)}
        flatbuffers["qat_int8"] = int8_export(qat, prepared.images[train])
    for name, flatbuffer in flatbuffers.items():
        tflite = TFLiteModel(flatbuffer)
        results[name] = {
            **latency_percentiles(lambda m=tflite: m.logit(images[0]), repeats),
            "f1": _f1(tflite.logits(images), labels, binary),
            "float_ops": float(len(float_ops(flatbuffer))),
            "size_bytes": float(len(flatbuffer)),
        }
    return results


def _f1(logits: np.ndarray, labels: np.ndarray, binary: bool) -> float:
    return classification_metrics(labels, probabilities(logits, binary))["f1"]


def measure(cfg: Config, norms: tuple[str, ...] = ("group", "batch"), repeats: int = REPEATS) -> dict[str, dict]:
    """For each normalisation: the k-fold F1 (``cfg.folds`` folds) and :func:`format_results` of a student trained on all
    training data for ``cfg.epochs`` epochs, with QAT where it folds. Hard labels only; MLflow logs to a scratch store."""
    prepared = prepare_data(cfg)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        for norm in norms:
            run_cfg = cfg.replace(student_norm=norm, no_kd=True)
            with mlflow.start_run(run_name=f"quantization-{norm}"):
                cv = cross_validate_student(run_cfg, prepared, None, list(range(run_cfg.fold_count)))
                set_seed(cfg.seed)

                def build_trainer(norm: str = norm) -> Distiller:
                    student = build_student(cfg.student_size, cfg.image_size, prepared.dataset.num_classes, seed=cfg.seed, norm=norm)
                    trainer = Distiller(student, None, cfg.temperature, 1.0, prepared.dataset.binary)
                    trainer.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
                    return trainer

                student = train_on_all_data(
                    prepared, run_cfg, build_trainer, None, cfg.epochs, f"student {norm}", recalibrate=norm == "batch"
                )
                rows = prepared.splits.train
                qat = (
                    None
                    if norm == "group"
                    else fine_tune_qat(student, run_cfg, prepared.images[rows], prepared.dataset.labels[rows], describe=f"student {norm}")
                )
            out[norm] = {"kfold_f1": cv.summary(), "formats": format_results(student, prepared, qat, repeats)}
    return out


def print_results(results: dict[str, dict], cfg: Config) -> None:
    print(f"INT8 student {cfg.student_size} at {cfg.image_size} px, {cfg.epochs} epochs, hard labels; batch-1 p50 latency, hold-out F1")
    for norm, result in results.items():
        summary = result["kfold_f1"]
        print(f"student_norm={norm}: {cfg.folds}-fold F1 {summary['f1_mean']:.4f} ± {summary['f1_std']:.4f}")
        formats = result["formats"]
        for name, values in formats.items():
            timing = f"p50 {values['p50_ms']:.3f} ms  p95 {values['p95_ms']:.3f} ms" if "p50_ms" in values else " " * 29
            extra = f"  float ops {int(values['float_ops'])}" if "float_ops" in values else ""
            print(f"  {name:<15} {timing}  hold-out F1 {values['f1']:.4f}{extra}")
        float32, keras_ms = formats["tflite_float32"]["p50_ms"], formats["keras"]["p50_ms"]
        for name in ("ptq_int8", "qat_int8"):
            if name in formats:
                ms = formats[name]["p50_ms"]
                print(
                    f"  {name}: {float32 / ms:.2f}x TFLite float32, {keras_ms / ms:.2f}x Keras; "
                    f"F1 {formats[name]['f1'] - formats['tflite_float32']['f1']:+.4f} vs float32"
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--student_size", default="28x3")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=200, help="timed batch-1 calls per format")
    parser.add_argument("--out", default="", help="JSON file for the results")
    args = parser.parse_args(argv)
    cfg = Config(
        data_dir=args.data_dir,
        image_size=args.image_size,
        student_size=args.student_size,
        epochs=args.epochs,
        patience=args.patience,
        folds=args.folds,
    )
    results = measure(cfg, repeats=args.repeats)
    print_results(results, cfg)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
