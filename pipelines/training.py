"""Shared training machinery: tf.data input pipelines, class weights, fitting with MLflow logging."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import keras
import mlflow
import numpy as np
import tensorflow as tf

from pipelines.config import Config, PipelineError
from pipelines.evaluate import class_keys, classification_metrics, confusion_matrix, model_logits, per_class_f1, probabilities
from pipelines.models import recalibrate_batch_norm
from pipelines.names import Metric
from pipelines.views import image_keys, mixup, pick_view

if TYPE_CHECKING:
    from pipelines.distiller import Distiller
    from pipelines.prepare import Prepared


def set_seed(seed: int) -> None:
    """Python, NumPy and TensorFlow seeds in one place, so a single-worker run is repeatable."""
    keras.utils.set_random_seed(seed)


# Config.precision -> the Keras dtype policy models are built and trained under. Under mixed_bfloat16 the
# variables stay float32 and the logits layers are float32 (pipelines/models.py): losses see float32 logits.
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


@contextlib.contextmanager
def training_precision(precision: str):
    """Build models under ``precision``'s dtype policy (a layer keeps the policy it was built with, so they train
    in it anywhere); the previous global policy comes back after, so code that builds models or augmentation
    layers outside (input pipelines, loading, export, serving) stays float32."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(DTYPE_POLICIES[precision])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _float32_policies(config):
    """A model config with every layer's dtype policy made float32 (mixed_bfloat16 -> float32)."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy" and isinstance(config.get("config"), dict):
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {key: _float32_policies(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_policies(value) for value in config]
    return config


def as_float32(model: keras.Model) -> keras.Model:
    """The model itself when it is float32; else a float32 twin with the same weights, for inference and saving.

    Mixed-precision variables are float32 already, so the weights carry over exactly; only the arithmetic of
    the twin (and what its saved config says) changes. Saved models, cached logits and exports are float32.
    """
    if all(layer.dtype_policy.name == "float32" for layer in model._flatten_layers()):
        return model
    with training_precision("float32"):
        twin = model.__class__.from_config(_float32_policies(model.get_config()))
    twin.set_weights(model.get_weights())
    return twin


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced weights n / (k * n_c): each class contributes equally to the hard loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return (len(labels) / (num_classes * np.maximum(counts, 1))).astype(np.float32)


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    sample_weights: np.ndarray | None = None,
    teacher_logits: np.ndarray | None = None,
    batch_size: int = 32,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
    view_keys: np.ndarray | None = None,
    mix: bool = False,
) -> tf.data.Dataset:
    """``({"image", ["teacher_logits"]}, label[, weight])`` batches: in memory, shuffled, augmented, prefetched.

    Images arrive already decoded and preprocessed, so the pipeline only slices, augments and batches.
    Cached teacher logits stay those of the un-augmented image (kd_mode standard): the price of not running the teacher.
    The slices are the only copy of the images: no ``.cache()`` (it kept a second one) and no float32 copy of
    float32 input; slicing runs thousands of images/s, far ahead of training (benchmarks/scaling.py measures it).

    Augmentation is :func:`pipelines.views.augmented_view`, a stateless function of (image key, draw): the draws come
    from ``seed`` and differ per epoch, so the views are made in parallel and the same seed still gives the same
    batches. ``view_keys`` (:func:`pipelines.views.image_keys` of the rows) are the image keys, else each row's position.
    Given ``view_keys``, every image is augmented whatever ``augment`` says (consistent KD, pipelines/views.py): with
    ``teacher_logits`` of every row's views ``(rows, views, units)``, each image comes as one of its cached views with the
    teacher's logits of that view; else as a fresh view. ``mix``: each batch mixed by mixup (consistent KD with an online
    teacher, which then runs on the very batch the student sees, or none). The views depend on the keys alone; ``seed``
    only shuffles and draws which view.
    """
    features = {"image": np.asarray(images, dtype=np.float32)}
    if teacher_logits is not None:
        features["teacher_logits"] = np.asarray(teacher_logits, dtype=np.float32)
    augmented = augment or view_keys is not None
    if augmented:
        features["view_key"] = np.asarray(np.arange(len(labels)) if view_keys is None else view_keys, dtype=np.int64)
    if mix and sample_weights is None:
        sample_weights = np.ones(len(labels), dtype=np.float32)
    elements = (
        (features, labels.astype(np.int32))
        if sample_weights is None
        else (features, labels.astype(np.int32), sample_weights.astype(np.float32))
    )
    dataset = tf.data.Dataset.from_tensor_slices(elements)
    if shuffle:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if augmented:
        # Views are stateless functions of their seed pairs: parallel calls cannot change them.
        draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip((dataset, draws)).map(
            lambda element, draw: (pick_view(element[0], draw), *element[1:]), num_parallel_calls=tf.data.AUTOTUNE
        )
    dataset = dataset.batch(batch_size)
    if mix:
        draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip((dataset, draws)).map(lambda batch, draw: mixup(*batch, draw))
    return dataset.prefetch(tf.data.AUTOTUNE)


class MlflowEpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics to MLflow as ``<prefix><name>`` with the epoch as step; stops with a clear error on NaN."""

    def __init__(self, prefix: str, describe: str, learning_rate: float):
        super().__init__()
        self.prefix, self.describe, self.learning_rate = prefix, describe, learning_rate

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not all(math.isfinite(float(v)) for v in logs.values()):
            bad = {k: float(v) for k, v in logs.items() if not math.isfinite(float(v))}
            raise PipelineError(
                f"{self.describe}: training diverged at epoch {epoch + 1} ({bad}); lower learning_rate (now {self.learning_rate}) "
                "or check the inputs"
            )
        mlflow.log_metrics({f"{self.prefix}{k}": float(v) for k, v in logs.items()}, step=epoch)


def progress_verbosity() -> int:
    """Keras progress bars on a terminal; one line per epoch in pipes, quiet in CI."""
    if os.environ.get("CI"):
        return 0
    return 1 if sys.stdout.isatty() else 2


# The batch size ``learning_rate`` is given for: a larger batch scales it by the ``lr_scaling`` rule.
REFERENCE_BATCH = 16


def peak_learning_rate(cfg: Config, learning_rate: float | None = None) -> float:
    """``learning_rate`` (``cfg.learning_rate`` unless given), set for batches of REFERENCE_BATCH, scaled to ``cfg.batch_size``:
    by the batch ratio (``linear``, Goyal et al. 2017), its square root (``sqrt``, the rule for Adam: Malladi et al. 2022)
    or not at all (``none``)."""
    ratio = cfg.batch_size / REFERENCE_BATCH
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[cfg.lr_scaling]
    return (cfg.learning_rate if learning_rate is None else learning_rate) * factor


@keras.saving.register_keras_serializable(package="kd")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from ``peak / warmup_steps`` to ``peak`` over ``warmup_steps``, then constant or cosine decay to 0
    at ``total_steps``. Per optimizer step, so ``steps_per_execution`` does not change it."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, cosine: bool):
        self.peak, self.warmup_steps, self.total_steps, self.cosine = float(peak), int(warmup_steps), int(total_steps), bool(cosine)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32") + 1.0
        warmup = keras.ops.minimum(1.0, step / max(self.warmup_steps, 1))
        if not self.cosine:
            return self.peak * warmup
        progress = keras.ops.clip((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0.0, 1.0)
        return self.peak * warmup * 0.5 * (1.0 + keras.ops.cos(math.pi * progress))

    def get_config(self) -> dict:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps, "cosine": self.cosine}


def optimizer(cfg: Config, steps_per_epoch: int, epochs: int, learning_rate: float | None = None) -> keras.optimizers.Optimizer:
    """Adam, or AdamW when ``weight_decay`` > 0, at :func:`peak_learning_rate` with ``warmup_epochs`` of linear warm-up and
    the ``lr_schedule`` over ``epochs``; with none of these it is today's plain ``Adam(learning_rate)``."""
    peak = peak_learning_rate(cfg, learning_rate)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    rate = peak
    if warmup_steps or cfg.lr_schedule == "cosine":
        rate = WarmupSchedule(peak, warmup_steps, steps_per_epoch * epochs, cfg.lr_schedule == "cosine")
    if cfg.weight_decay > 0:
        return keras.optimizers.AdamW(rate, weight_decay=cfg.weight_decay)
    return keras.optimizers.Adam(rate)


def fit(
    model: keras.Model,
    train: tf.data.Dataset,
    validation: tf.data.Dataset | None,
    cfg: Config,
    prefix: str,
    describe: str,
    epochs: int | None = None,
    learning_rate: float | None = None,
) -> int:
    """Compile ``model`` with :func:`optimizer` and ``steps_per_execution`` and train it with early stopping on validation
    loss (best weights restored); returns the best epoch count. ``learning_rate``: another base rate than ``cfg``'s.

    Keras runs ``steps_per_execution`` steps in one call of its compiled function: the epoch's metrics, early stopping
    and the progress line still come per epoch, and the last call of an epoch takes the steps that are left."""
    epochs = epochs or cfg.epochs
    steps = int(train.cardinality())
    model.compile(optimizer=optimizer(cfg, steps, epochs, learning_rate), steps_per_execution=cfg.steps_per_execution)
    callbacks: list[keras.callbacks.Callback] = [MlflowEpochLogger(prefix, describe, cfg.learning_rate)]
    stopper = None
    if validation is not None:
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True)
        callbacks.append(stopper)
    history = model.fit(train, validation_data=validation, epochs=epochs, callbacks=callbacks, shuffle=False, verbose=progress_verbosity())
    if validation is None:
        return len(history.history["loss"])
    return int(np.argmin(history.history["val_loss"])) + 1


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
) -> CrossValidation:
    """Train one model per fold with early stopping on that fold's validation rows; evaluate the model alone.

    ``build_trainer(k)`` gives the compiled :class:`Distiller` for fold k (alpha = 1 and no teacher for plain
    training); ``teacher_logits(k)`` gives cached logits for every row, or None (online or no KD).
    ``on_fold(k, metrics)`` sees each fold's validation metrics as they come (a search reports and prunes there).
    ``view_logits`` makes training consistent (:func:`make_dataset` with view keys): ``view_logits(k)`` gives the
    cached logits of every row's views ``(N, views, units)``, or None for fresh views every step (online or no KD);
    the validation rows stay plain images with ``teacher_logits(k)``.
    ``recalibrate``: each trained model's BatchNorm statistics recomputed on its training images before it is evaluated
    (:func:`pipelines.models.recalibrate_batch_norm`; the student with ``student_norm=batch``).
    """
    dataset, images = prepared.dataset, prepared.images
    labels = dataset.labels
    keys = image_keys(dataset.manifest["sha256"].to_numpy(), cfg.seed) if view_logits is not None or cfg.augment else None
    models, fold_metrics, best_epochs, oof_rows, oof_probs, fold_matrices = [], [], [], [], [], []
    for k in fold_ids:
        train_rows, val_rows = prepared.splits.folds[k]
        weights = class_weights(labels[train_rows], dataset.num_classes)[labels]
        logits = teacher_logits(k)
        set_seed(cfg.seed + k)
        # Folds are numbered from 0 everywhere: here, in metric and artifact names (f1_fold_<k>), pruning messages and the report.
        print(
            f"{describe}: fold {k} of folds 0-{len(prepared.splits.folds) - 1} ({len(train_rows)} train, {len(val_rows)} validation images)"
        )
        with training_precision(cfg.precision):
            trainer = build_trainer(k)
        # Consistent training reads the views' cached logits (None: fresh views); validation images stay plain either way.
        train_logits = view_logits(k) if view_logits is not None else logits
        train = make_dataset(
            images[train_rows],
            labels[train_rows],
            weights[train_rows],
            None if train_logits is None else train_logits[train_rows],
            cfg.batch_size,
            shuffle=True,
            augment=cfg.augment,
            seed=cfg.seed + k,
            view_keys=None if keys is None else keys[train_rows],
            mix=view_logits is not None and train_logits is None,
        )
        validation = make_dataset(
            images[val_rows], labels[val_rows], weights[val_rows], None if logits is None else logits[val_rows], cfg.batch_size
        )
        best_epochs.append(fit(trainer, train, validation, cfg, prefix=f"fold_{k}_", describe=f"{describe} fold {k}"))
        student = as_float32(trainer.student)
        if recalibrate:
            recalibrate_batch_norm(student, images[train_rows])
        probs = probabilities(model_logits(student, images[val_rows]), dataset.binary)
        fold_metrics.append(classification_metrics(labels[val_rows], probs, dataset.class_names))
        fold_matrices.append(confusion_matrix(labels[val_rows], probs))
        print(f"{describe}: fold {k} F1 {fold_metrics[-1]['f1']:.4f} (best epoch {best_epochs[-1]})")
        models.append(student)
        oof_rows.append(val_rows)
        oof_probs.append(probs)
        if on_fold is not None:
            on_fold(k, fold_metrics[-1])
    return CrossValidation(models, fold_metrics, best_epochs, np.concatenate(oof_rows), np.concatenate(oof_probs), fold_ids, fold_matrices)


def train_on_all_data(
    prepared: Prepared,
    cfg: Config,
    build_trainer: Callable[[], Distiller],
    teacher_logits: np.ndarray | None,
    epochs: int,
    describe: str,
    prefix: str = "all_",
    consistent: bool = False,
    recalibrate: bool = False,
) -> keras.Model:
    """Train the compiled :class:`Distiller` ``build_trainer()`` gives on every non-test row for a fixed number of
    epochs (no validation split is left to stop on); returns its student as a float32 model.

    ``consistent``: consistent batches (:func:`make_dataset` with view keys); ``teacher_logits`` are then the cached
    logits of every row's views ``(N, views, units)``, or None for fresh views (online or no KD). ``recalibrate``: the
    BatchNorm statistics recomputed on the training images afterwards, as in :func:`cross_validate`."""
    with training_precision(cfg.precision):
        trainer = build_trainer()
    labels, rows = prepared.dataset.labels, prepared.splits.train
    weights = class_weights(labels[rows], prepared.dataset.num_classes)[labels]
    logits = None if teacher_logits is None else teacher_logits[rows]
    keys = image_keys(prepared.dataset.manifest["sha256"].to_numpy(), cfg.seed)[rows] if consistent or cfg.augment else None
    train = make_dataset(
        prepared.images[rows],
        labels[rows],
        weights[rows],
        logits,
        cfg.batch_size,
        shuffle=True,
        augment=cfg.augment,
        seed=cfg.seed,
        view_keys=keys,
        mix=consistent and teacher_logits is None,
    )
    print(f"{describe}: all training data ({len(rows)} images) for {epochs} epochs")
    fit(trainer, train, None, cfg, prefix=prefix, describe=describe, epochs=epochs)
    student = as_float32(trainer.student)
    if recalibrate:
        recalibrate_batch_norm(student, prepared.images[rows])
    return student
