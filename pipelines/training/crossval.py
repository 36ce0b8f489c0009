"""Cross-validation: one model per fold, trained with early stopping on that fold's validation rows and evaluated alone;
folds one after another in this process, or ``fold_workers`` at a time, each in a process of its own.

A fold is one :class:`FoldTask` and :func:`train_fold` trains it, in this process or in a worker: the same code, the
same seeds (``seed + k``), the same MLflow metrics (``fold_<k>_*``, logged to the step's run by id). Small convolutions
use two intra-op threads poorly, so two folds with one thread each keep two cores busier than one fold with two.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import mlflow
import numpy as np

from pipelines.config import Config
from pipelines.evaluation.metrics import class_keys, classification_metrics, confusion_matrix, model_logits, per_class_f1, probabilities
from pipelines.log import logger
from pipelines.models.builders import load_keras_model, recalibrate_batch_norm
from pipelines.names import Metric
from pipelines.training.fit import as_float32, class_weights, fit, make_dataset, set_seed, training_batches, training_precision
from pipelines.training.views import image_keys

if TYPE_CHECKING:
    from pipelines.data.prepared import Prepared
    from pipelines.models.distiller import Distiller


@dataclass
class CrossValidation:
    """Per-fold results of one model family; ``oof_probs`` holds each row's probabilities from the fold that held it out."""

    models: list[keras.Model]
    fold_metrics: list[dict[str, float]]
    best_epochs: list[int]
    oof_rows: np.ndarray
    oof_probs: np.ndarray
    fold_ids: list[int]
    fold_matrices: list[np.ndarray] = field(default_factory=list)  # each fold's validation confusion matrix

    def confusion_matrices(self) -> dict[str, np.ndarray]:
        """``out_of_fold`` (all folds' validation rows pooled) and ``fold_<k>``: what ``evaluation/confusion_matrix.json`` holds.

        The per-class ``f1_<class>_mean`` of :meth:`summary` is the mean of the folds' F1 from these ``fold_<k>`` matrices.
        """
        return {"out_of_fold": np.sum(self.fold_matrices, axis=0), **{f"fold_{k}": m for k, m in zip(self.fold_ids, self.fold_matrices)}}

    def summary(self) -> dict[str, float]:
        """:func:`summarize_folds` of these folds."""
        return summarize_folds(self.fold_ids, self.fold_metrics)

    def minority_summary(self, class_names: list[str], minority: str) -> dict[str, float]:
        """The ``minority`` class's F1 and recall per fold (``f1_minority_fold_<k>``, ``recall_minority_fold_<k>``) and their
        mean and spread over folds (``f1_minority_mean`` / ``_std``, ``recall_minority_mean`` / ``_std``), from the folds'
        confusion matrices: the figures an imbalance comparison reads, whatever the positive class."""
        index = class_names.index(minority)
        f1_key = f"f1_{class_keys(class_names)[index]}"
        folds = [
            {"f1": per_class_f1(matrix, class_names)[f1_key], "recall": matrix[index, index] / max(matrix[index].sum(), 1)}
            for matrix in self.fold_matrices
        ]
        result = {}
        for k, metrics in zip(self.fold_ids, folds):
            result |= {Metric.minority_fold_f1(k): float(metrics["f1"]), Metric.minority_fold_recall(k): float(metrics["recall"])}
        for name in ("f1", "recall"):
            values = np.array([metrics[name] for metrics in folds], dtype=np.float64)
            result[f"{name}_minority_mean"] = float(np.mean(values))
            result[f"{name}_minority_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return result


def summarize_folds(fold_ids: list[int], fold_metrics: list[dict[str, float]]) -> dict[str, float]:
    """``f1_fold_<k>`` for each fold, and ``<metric>_mean`` / ``<metric>_std`` over folds: what a cross-validated run logs."""
    result = {f"f1_fold_{k}": m["f1"] for k, m in zip(fold_ids, fold_metrics)}
    for name in fold_metrics[0]:
        values = np.array([m[name] for m in fold_metrics], dtype=np.float64)
        result[f"{name}_mean"] = float(np.mean(values))
        result[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return result


@dataclass
class FoldTask:
    """Everything one fold's training needs, picklable for a worker process: ``build_trainer`` must then be a module-level
    callable (a class instance or :func:`functools.partial`), not a closure; the images are read from ``images_path``
    (a ``.npy`` file, memory-mapped) in a worker, or given as ``images`` here."""

    k: int
    cfg: Config
    build_trainer: Callable[[int], Distiller]
    train_rows: np.ndarray
    val_rows: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    train_logits: np.ndarray | None  # the training rows' (cached views') teacher logits, or None
    val_logits: np.ndarray | None
    keys: np.ndarray | None  # the training rows' view keys (augmentation, consistent KD), or None
    mix: bool
    describe: str
    recalibrate: bool
    images: np.ndarray | None = None
    images_path: str = ""
    run_id: str | None = None  # the run a worker logs to (this process: the active run), in the store at tracking_uri
    tracking_uri: str = ""


@dataclass
class FoldResult:
    model: keras.Model | None  # None from a worker: it saved the model to a file instead
    metrics: dict[str, float]
    best_epoch: int
    probs: np.ndarray
    matrix: np.ndarray


def train_fold(task: FoldTask) -> FoldResult:
    """Train and evaluate fold ``task.k``: class-weighted, seeded by ``seed + k``, early stopping on its validation rows."""
    cfg, k, labels = task.cfg, task.k, task.labels
    images = task.images if task.images is not None else np.load(task.images_path, mmap_mode="r")
    train_images, val_images = np.asarray(images[task.train_rows]), np.asarray(images[task.val_rows])
    weights = class_weights(labels[task.train_rows], len(task.class_names))[labels]
    logger().info(f"{task.describe}: fold {k} ({len(task.train_rows)} train, {len(task.val_rows)} validation images)")
    set_seed(cfg.seed + k)
    with training_precision(cfg.precision):
        trainer = task.build_trainer(k)
    train = training_batches(
        cfg, train_images, labels[task.train_rows], weights[task.train_rows], task.train_logits, cfg.seed + k, task.keys, task.mix
    )
    validation = make_dataset(val_images, labels[task.val_rows], weights[task.val_rows], task.val_logits, cfg.batch_size)
    best_epoch = fit(trainer, train, validation, cfg, prefix=f"fold_{k}_", describe=f"{task.describe} fold {k}", run_id=task.run_id)
    student = as_float32(trainer.student)
    if task.recalibrate:
        recalibrate_batch_norm(student, train_images)
    probs = probabilities(model_logits(student, val_images), len(task.class_names) == 2)
    metrics = classification_metrics(labels[task.val_rows], probs, task.class_names)
    logger().info(f"{task.describe}: fold {k} F1 {metrics['f1']:.4f} (best epoch {best_epoch})")
    return FoldResult(student, metrics, best_epoch, probs, confusion_matrix(labels[task.val_rows], probs))


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers narrow), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_worker(threads: int) -> None:
    """A fold worker's start: its share of the cores for TensorFlow, set before any op runs."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def _train_fold_in_worker(task: FoldTask, model_path: str) -> FoldResult:
    """:func:`train_fold` in a worker process, logging to the parent's store; its model goes back as a saved ``.keras``
    file (``model_path``)."""
    mlflow.set_tracking_uri(task.tracking_uri)
    result = train_fold(task)
    result.model.save(model_path)
    result.model = None
    return result


@functools.cache
def fold_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """``workers`` fold processes with ``cores // workers`` threads each, started once per process and kept for every
    cross-validation after (a search's trials): starting one costs seconds of imports. Spawned, never forked: a fork of
    a process whose TensorFlow already runs threads can hang."""
    threads = max(1, usable_cores() // workers)
    context = multiprocessing.get_context("spawn")
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(threads,))


def run_folds(tasks: list[FoldTask], workers: int, on_result: Callable[[FoldTask, FoldResult], None]) -> None:
    """Train ``tasks`` here one by one (``workers`` = 1) or in :func:`fold_pool`, handing each result to ``on_result`` in
    fold order as it is ready. An exception from ``on_result`` (a pruned trial) cancels the folds not yet started."""
    if workers <= 1:
        for task in tasks:
            on_result(task, train_fold(task))
        return
    run_id, tracking_uri = mlflow.active_run().info.run_id, mlflow.get_tracking_uri()
    pool = fold_pool(workers)
    with tempfile.TemporaryDirectory(prefix="kd-folds-") as tmp:
        images_path = str(Path(tmp) / "images.npy")
        np.save(images_path, tasks[0].images)
        futures = []
        for task in tasks:
            remote = dataclasses.replace(task, images=None, images_path=images_path, run_id=run_id, tracking_uri=tracking_uri)
            futures.append(pool.submit(_train_fold_in_worker, remote, str(Path(tmp) / f"fold_{task.k}.keras")))
        try:
            for task, future in zip(tasks, futures):
                result = future.result()
                result.model = load_keras_model(Path(tmp) / f"fold_{task.k}.keras")
                on_result(task, result)
        except BaseException:
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)  # the temporary folder outlives the folds still running
            raise


def cross_validate(
    prepared: Prepared,
    cfg: Config,
    fold_ids: list[int],
    build_trainer: Callable[[int], Distiller],
    teacher_logits: Callable[[int], np.ndarray | None],
    describe: str,
    on_fold: Callable[[int, dict[str, float]], None] | None = None,
    view_logits: Callable[[int], np.ndarray | None] | None = None,
    recalibrate: bool = False,
    mix: bool = False,
) -> CrossValidation:
    """Train one model per fold with early stopping on that fold's validation rows; evaluate the model alone.

    ``build_trainer(k)`` gives the :class:`Distiller` for fold k (alpha = 1 and no teacher for plain training), compiled
    by :func:`pipelines.training.fit.fit`; with ``cfg.fold_workers`` > 1 it must be picklable (:class:`FoldTask`).
    ``teacher_logits(k)`` gives cached logits for every row, or None (online or no KD).
    ``on_fold(k, metrics)`` sees each fold's validation metrics as they come (a search reports and prunes there).
    ``view_logits`` makes training consistent (:func:`make_dataset` with view keys): ``view_logits(k)`` gives the
    cached logits of every row's views ``(N, views, units)``, or None for fresh views every step (online or no KD);
    the validation rows stay plain images with ``teacher_logits(k)``. ``mix``: fresh views are mixed by mixup (never
    cached ones, whose logits are of unmixed views).
    ``recalibrate``: each trained model's BatchNorm statistics recomputed on its training images before it is evaluated
    (:func:`pipelines.models.builders.recalibrate_batch_norm`; the student with ``student_norm=batch``).
    """
    dataset = prepared.dataset
    keys = image_keys(dataset.manifest["sha256"].to_numpy(), cfg.seed) if view_logits is not None or cfg.augment else None
    tasks = []
    for k in fold_ids:
        train_rows, val_rows = prepared.splits.folds[k]
        logits = teacher_logits(k)
        # Consistent training reads the views' cached logits (None: fresh views); validation images stay plain either way.
        train_logits = view_logits(k) if view_logits is not None else logits
        tasks.append(
            FoldTask(
                k,
                cfg,
                build_trainer,
                train_rows,
                val_rows,
                dataset.labels,
                dataset.class_names,
                None if train_logits is None else train_logits[train_rows],
                None if logits is None else logits[val_rows],
                None if keys is None else keys[train_rows],
                mix=mix and view_logits is not None and train_logits is None,
                describe=describe,
                recalibrate=recalibrate,
                images=prepared.images,
            )
        )
    workers = min(cfg.fold_workers, len(tasks))
    # Folds are numbered from 0 everywhere: here, in metric and artifact names (f1_fold_<k>), pruning messages and the report.
    logger().info(f"{describe}: folds {', '.join(map(str, fold_ids))} of 0-{len(prepared.splits.folds) - 1}, {workers} at a time")
    cv = CrossValidation([], [], [], [], [], [], [])

    def collect(task: FoldTask, result: FoldResult) -> None:
        cv.models.append(result.model)
        cv.fold_metrics.append(result.metrics)
        cv.best_epochs.append(result.best_epoch)
        cv.oof_rows.append(task.val_rows)
        cv.oof_probs.append(result.probs)
        cv.fold_ids.append(task.k)
        cv.fold_matrices.append(result.matrix)
        if on_fold is not None:
            on_fold(task.k, result.metrics)

    run_folds(tasks, workers, collect)
    cv.oof_rows, cv.oof_probs = np.concatenate(cv.oof_rows), np.concatenate(cv.oof_probs)
    return cv
