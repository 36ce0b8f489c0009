"""Shared training machinery: tf.data input pipelines, class weights, fitting with MLflow logging."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import keras
import mlflow
import numpy as np
import tensorflow as tf

from pipelines.config import Config, PipelineError
from pipelines.log import chatty, logger
from pipelines.models.builders import recalibrate_batch_norm
from pipelines.training.compiled import compiled_like, copy_variables
from pipelines.training.views import image_keys, mixup, pick_view

if TYPE_CHECKING:
    from pipelines.data.prepared import Prepared
    from pipelines.models.distiller import Distiller


def set_seed(seed: int) -> None:
    """Python, NumPy and TensorFlow seeds in one place, so a single-worker run is repeatable."""
    keras.utils.set_random_seed(seed)


# Config.precision -> the Keras dtype policy models are built and trained under. Under mixed_bfloat16 the
# variables stay float32 and the logits layers are float32 (pipelines/models/builders.py): losses see float32 logits.
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
    parallel: bool = True,
) -> tf.data.Dataset:
    """``({"image", ["teacher_logits"]}, label[, weight])`` batches: in memory, shuffled, augmented, prefetched.

    Images arrive already decoded and preprocessed, so the pipeline only slices, augments and batches.
    Cached teacher logits stay those of the un-augmented image (kd_mode standard): the price of not running the teacher.
    The slices are the only copy of the images: no ``.cache()`` (it kept a second one) and no float32 copy of
    float32 input; slicing runs thousands of images/s, far ahead of training (benchmarks/scaling.py measures it).

    Augmentation is :func:`pipelines.training.views.augmented_view`, a stateless function of (image key, draw): the draws come
    from ``seed`` and differ per epoch, so the views are made in parallel and the same seed still gives the same
    batches. ``view_keys`` (:func:`pipelines.training.views.image_keys` of the rows) are the image keys, else each row's position.
    Given ``view_keys``, every image is augmented whatever ``augment`` says (consistent KD, pipelines/training/views.py): with
    ``teacher_logits`` of every row's views ``(rows, views, units)``, each image comes as one of its cached views with the
    teacher's logits of that view; else as a fresh view. ``mix``: each batch mixed by mixup (consistent KD with an online
    teacher, which then runs on the very batch the student sees, or none). The views depend on the keys alone; ``seed``
    only shuffles and draws which view. ``parallel``: views made on every core (the same views, in the same order).
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
            lambda element, draw: (pick_view(element[0], draw), *element[1:]), num_parallel_calls=tf.data.AUTOTUNE if parallel else None
        )
    dataset = dataset.batch(batch_size)
    if mix:
        draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip((dataset, draws)).map(lambda batch, draw: mixup(*batch, draw))
    return dataset.prefetch(tf.data.AUTOTUNE)


def training_batches(
    cfg: Config,
    images: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    teacher_logits: np.ndarray | None,
    seed: int,
    view_keys: np.ndarray | None,
    mix: bool,
) -> tf.data.Dataset:
    """The shuffled training batches of :func:`make_dataset` under ``cfg``'s batch size and augmentation settings: what
    cross-validation folds and all-data training both train on."""
    return make_dataset(
        images,
        labels,
        weights,
        teacher_logits,
        cfg.batch_size,
        shuffle=True,
        augment=cfg.augment,
        seed=seed,
        view_keys=view_keys,
        mix=mix,
        parallel=cfg.parallel_augment,
    )


class MlflowEpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics to MLflow as ``<prefix><name>`` with the epoch as step (to run ``run_id``, else the active run);
    stops with a clear error on NaN."""

    def __init__(self, prefix: str, describe: str, learning_rate: float, run_id: str | None = None):
        super().__init__()
        self.prefix, self.describe, self.learning_rate, self.run_id = prefix, describe, learning_rate, run_id

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not all(math.isfinite(float(v)) for v in logs.values()):
            bad = {k: float(v) for k, v in logs.items() if not math.isfinite(float(v))}
            raise PipelineError(
                f"{self.describe}: training diverged at epoch {epoch + 1} ({bad}); lower learning_rate (now {self.learning_rate}) "
                "or check the inputs"
            )
        metrics = {f"{self.prefix}{k}": float(v) for k, v in logs.items()}
        if self.run_id is None:
            mlflow.log_metrics(metrics, step=epoch)
        else:  # a fold worker: the step's run is active in the parent process only
            now = int(time.time() * 1000)
            mlflow.MlflowClient().log_batch(self.run_id, [mlflow.entities.Metric(k, v, now, epoch) for k, v in metrics.items()])


def progress_verbosity() -> int:
    """Keras progress bars on a terminal; one line per epoch in pipes; none in CI or under ``--quiet``."""
    if os.environ.get("CI") or not chatty():
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


def describe_optimiser(cfg: Config, learning_rate: float | None = None) -> str:
    """What :func:`optimizer` builds for ``cfg``, in words (the report's methods text): optimiser, batch, rate and schedule."""
    name = f"AdamW (decoupled weight decay {cfg.weight_decay:g})" if cfg.weight_decay > 0 else "Adam"
    base = cfg.learning_rate if learning_rate is None else learning_rate
    peak = peak_learning_rate(cfg, base)
    rate = f"learning rate {peak:.4g}"
    if peak != base:  # lr_scaling none keeps the rate as given
        rule = {"sqrt": "the square root of the batch ratio", "linear": "the batch ratio"}[cfg.lr_scaling]
        rate += f" ({base:g} for batches of {REFERENCE_BATCH}, scaled by {rule})"
    schedule = f", a linear warm-up over {cfg.warmup_epochs:g} epoch(s)" if cfg.warmup_epochs else ""
    schedule += ", then cosine decay to 0 at the last epoch" if cfg.lr_schedule == "cosine" else ""
    return f"{name}, batch size {cfg.batch_size}, {rate}{schedule}"


def fit(
    model: keras.Model,
    train: tf.data.Dataset,
    validation: tf.data.Dataset | None,
    cfg: Config,
    prefix: str,
    describe: str,
    epochs: int | None = None,
    learning_rate: float | None = None,
    run_id: str | None = None,
) -> int:
    """Train the :class:`Distiller` ``model`` with :func:`optimizer` and ``steps_per_execution`` and early stopping on
    validation loss (best weights restored); returns the best epoch count. ``learning_rate``: another base rate than
    ``cfg``'s; ``run_id``: the run the epochs' metrics go to, when it is not this process's active run.

    Keras runs ``steps_per_execution`` steps in one call of its compiled function: the epoch's metrics, early stopping
    and the progress line still come per epoch, and the last call of an epoch takes the steps that are left. The compiled
    function is the last fit's when ``model`` has its structure (:func:`~pipelines.training.compiled.compiled_like`);
    ``model`` ends with the trained variables either way."""
    epochs = epochs or cfg.epochs
    steps = int(train.cardinality())
    trainer = compiled_like(model, optimizer(cfg, steps, epochs, learning_rate), cfg.steps_per_execution)
    callbacks: list[keras.callbacks.Callback] = [MlflowEpochLogger(prefix, describe, cfg.learning_rate, run_id)]
    stopper = None
    if validation is not None:
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True)
        callbacks.append(stopper)
    history = trainer.fit(
        train, validation_data=validation, epochs=epochs, callbacks=callbacks, shuffle=False, verbose=progress_verbosity()
    )
    copy_variables(trainer, model)
    if validation is None:
        return len(history.history["loss"])
    return int(np.argmin(history.history["val_loss"])) + 1


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
    train = training_batches(
        cfg, prepared.images[rows], labels[rows], weights[rows], logits, cfg.seed, keys, consistent and teacher_logits is None
    )
    logger().info(f"{describe}: all training data ({len(rows)} images) for {epochs} epochs")
    fit(trainer, train, None, cfg, prefix=prefix, describe=describe, epochs=epochs)
    student = as_float32(trainer.student)
    if recalibrate:
        recalibrate_batch_norm(student, prepared.images[rows])
    return student
