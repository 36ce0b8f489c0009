"""Step ``teacher``: one teacher per fold (of every repeat) plus one on all training data, with their logits for distillation.

A finished teacher run with the same data digest, parameters and code fingerprint is reused, never retrained.
Artifacts: ``models/fold_<k>.keras``, ``models/all.keras``, ``logits/teacher_logits.npz`` (keyed by image
sha256: ``fold_<k>`` and ``all`` logits for every image, ``views_fold_<k>`` and ``views_all`` those of its
``kd_views`` consistent views, pipelines/training/views.py), evaluation plots and a classification report.

The teachers train, stop early and predict at ``teacher_image_size`` (the student's ``image_size`` when 0), on the
same rows and splits as the student: the cached logits are keyed by image, so a student at a lower resolution
reads them unchanged and its training costs what it did.

An ensemble (``teacher_arch=resnet:L,hybrid:S``) is its members' ordinary teacher runs, each trained (or reused) on
the same rows and splits (:func:`pipelines.config.teacher_members`) and named by their run ids joined with commas
(the ``kd.teacher_run_id`` tag): its logits and models are the mean of its members', key by key and fold by fold.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path

import keras
import mlflow
import numpy as np

from pipelines.config import TEACHER_PARAMS, Config, PipelineError, teacher_members
from pipelines.data.images import load_images
from pipelines.evaluation.metrics import classification_metrics, confusion_matrix, model_logits, probabilities, write_evaluation_artifacts
from pipelines.log import logger
from pipelines.models.builders import build_teacher, load_keras_model
from pipelines.models.distiller import Distiller
from pipelines.names import Metric, RunTag
from pipelines.steps.prepare import Prepared, prepare_data
from pipelines.tracking.runs import reuse_finished, step_run, tracked_run
from pipelines.training.crossval import cross_validate, summarize_folds
from pipelines.training.fit import set_seed, train_on_all_data
from pipelines.training.views import image_keys, view_logits

LOGITS_ARTIFACT = "logits/teacher_logits.npz"


def _trainer(cfg: Config, num_classes: int, seed: int) -> Distiller:
    """Plain supervised training is the Distiller with alpha = 1 and no teacher: one loss, one set of metrics (compiled by
    :func:`pipelines.training.fit.fit`)."""
    network = build_teacher(cfg.teacher_arch, cfg.teacher_size, num_classes, cfg.teacher_weights, seed=seed)
    return Distiller(network, None, temperature=1.0, alpha=1.0, binary=num_classes == 2)


@dataclasses.dataclass(frozen=True)
class FoldTeacher:
    """Fold k's teacher, from the teacher's seed + k: a picklable callable, so fold workers (``fold_workers``) can be handed it."""

    cfg: Config
    num_classes: int

    def __call__(self, k: int) -> Distiller:
        return _trainer(self.cfg, self.num_classes, self.cfg.teacher_seed + k)


def at_teacher_size(cfg: Config, prepared: Prepared) -> Prepared:
    """The student's prepared data with the images at the teacher's size: same rows, same splits."""
    if cfg.teacher_size == prepared.images.shape[1]:
        return prepared
    return dataclasses.replace(prepared, images=load_images(prepared.dataset, cfg.teacher_size, cfg.cache_dir))


def train_teacher(cfg: Config, prepared: Prepared | None = None, nested: bool = False, launched_run_id: str | None = None) -> str:
    """Find or train the teachers for ``cfg``; returns the run id that holds them, or an ensemble's member run ids
    joined with commas (what :func:`load_teacher_logits` and :func:`load_teacher_model` take).

    ``launched_run_id``: the run ``mlflow run`` started for this step, which its run resumes (resolved once, in
    :func:`kd.cli.run_command`).
    """
    prepared = prepared or prepare_data(cfg)
    members = teacher_members(cfg)
    if len(members) == 1:
        return _train_single(cfg, prepared, nested, launched_run_id)
    if nested or not launched_run_id:
        return ",".join(_train_single(member, prepared, nested) for member in members)
    with tracked_run(cfg, run_id=launched_run_id):  # the launched run stands for the ensemble; the members nest in it
        run_ids = ",".join(_train_single(member, prepared, nested=True) for member in members)
        mlflow.set_tag(RunTag.TEACHER_RUN_ID, run_ids)
        return run_ids


def _train_single(cfg: Config, prepared: Prepared, nested: bool, launched_run_id: str | None = None) -> str:
    """Find or train one teacher (per fold and on all data) for a single ``teacher_arch``; returns its run id.

    It trains from ``cfg.teacher_seed``: ensemble members that repeat an architecture differ by it, while the
    splits and the view keys stay those of ``cfg.seed``, the student's."""
    dataset, splits = prepared.dataset, prepared.splits
    previous = reuse_finished("teacher", cfg, TEACHER_PARAMS, dataset.digest, nested, launched_run_id)
    if previous:
        return previous
    prepared = at_teacher_size(cfg, prepared)
    images, keys = prepared.images, image_keys(dataset.manifest["sha256"].to_numpy(), cfg.seed)
    # initialisation, shuffling, augmentation from the teacher's seed; prepared holds the splits
    trainer_cfg = cfg if cfg.teacher_seed == cfg.seed else cfg.replace(seed=cfg.teacher_seed)
    with step_run("teacher", cfg, TEACHER_PARAMS, dataset, splits, nested, launched_run_id) as run:
        cv = cross_validate(
            prepared,
            trainer_cfg,
            list(range(cfg.fold_count)),
            FoldTeacher(cfg, dataset.num_classes),
            lambda k: None,
            f"teacher {cfg.teacher_arch}",
        )
        logits = {f"fold_{k}": model_logits(model, images) for k, model in enumerate(cv.models)}
        if cfg.kd_mode == "consistent":
            logits |= {f"views_fold_{k}": view_logits(model, images, keys, cfg.kd_views) for k, model in enumerate(cv.models)}

        # The all-data teacher has no validation split to stop on: it trains for the folds' median best epoch.
        epochs = max(1, int(np.median(cv.best_epochs)))
        labels = dataset.labels
        set_seed(cfg.teacher_seed)
        teacher = train_on_all_data(
            prepared, trainer_cfg, lambda: _trainer(cfg, dataset.num_classes, cfg.teacher_seed), None, epochs, "teacher (all data)"
        )
        logits["all"] = model_logits(teacher, images)
        if cfg.kd_mode == "consistent":
            logits["views_all"] = view_logits(teacher, images, keys, cfg.kd_views)
        test_probs = probabilities(logits["all"][splits.test], dataset.binary)
        test_metrics = classification_metrics(labels[splits.test], test_probs, dataset.class_names)

        mlflow.set_tag(RunTag.MINORITY_CLASS, prepared.minority)
        mlflow.log_metrics(
            {
                **cv.summary(),
                **cv.minority_summary(dataset.class_names, prepared.minority),
                **{f"test_{k}": v for k, v in test_metrics.items()},
                Metric.TEACHER_PARAMS: teacher.count_params(),
                "all_data_epochs": epochs,
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            (out / "models").mkdir()
            for k, model in enumerate(cv.models):
                model.save(out / "models" / f"fold_{k}.keras")
            teacher.save(out / "models" / "all.keras")
            (out / "logits").mkdir()
            # Fixed-width strings, not objects: the artifact then loads without pickle (allow_pickle=False).
            np.savez_compressed(out / LOGITS_ARTIFACT, sha256=dataset.manifest["sha256"].to_numpy().astype("U64"), **logits)
            # The all-data teacher's hold-out matrix is scope "test", like its test_* metrics.
            matrices = {**cv.confusion_matrices(), "test": confusion_matrix(labels[splits.test], test_probs)}
            write_evaluation_artifacts(
                labels[cv.oof_rows], cv.oof_probs, dataset.class_names, out / "evaluation", "teacher, out-of-fold", matrices
            )
            mlflow.log_artifacts(tmp)
        logger().info(
            f"teacher {cfg.teacher_arch}: F1 {cv.summary()[Metric.F1_MEAN]:.4f} ± {cv.summary()[Metric.F1_STD]:.4f} over {cfg.fold_count} "
            "folds, "
            f"{teacher.count_params():,} parameters, run {run.info.run_id}"
        )
        return run.info.run_id


@functools.lru_cache(maxsize=4)
def _stored_logits(run_id: str) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Downloaded once per process: a search calls this for every trial."""
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=LOGITS_ARTIFACT, dst_path=tmp)
        try:
            with np.load(path, allow_pickle=False) as stored:
                index = {str(digest): row for row, digest in enumerate(stored["sha256"])}
                return index, {name: stored[name] for name in stored.files if name != "sha256"}
        except ValueError as error:  # object arrays: unpickling an artifact could run code
            raise PipelineError(
                f"teacher run {run_id}: {LOGITS_ARTIFACT} holds pickled objects ({error}), which are not loaded; delete that run "
                f"(mlflow runs delete --run-id {run_id}) so the teacher is retrained"
            ) from None


def _member_logits(run_id: str, sha256: np.ndarray) -> dict[str, np.ndarray]:
    """One teacher run's cached logits, reordered to the given rows (matched by image sha256)."""
    index, logits = _stored_logits(run_id)
    order = np.array([index[digest] for digest in sha256])
    return {name: values[order] for name, values in logits.items()}


def load_teacher_logits(run_ids: str, sha256: np.ndarray) -> dict[str, np.ndarray]:
    """The teacher's cached logits for the given rows (matched by image sha256): those of its run, or for an
    ensemble (comma-separated run ids) the mean of its members' logits, key by key (``fold_<k>``, ``all``, ``views_*``)."""
    members = [_member_logits(run_id, sha256) for run_id in run_ids.split(",")]
    if len(members) == 1:
        return members[0]
    return {name: np.mean([member[name] for member in members], axis=0) for name in members[0]}


def teacher_cv_summary(
    run_ids: str, sha256: np.ndarray, labels: np.ndarray, folds: list[np.ndarray], class_names: list[str]
) -> dict[str, float]:
    """The teacher's cross-validation metrics (``f1_fold_<k>``, ``<metric>_mean`` / ``_std``) from its cached logits:
    fold k's validation rows (``folds[k]``, rows of ``sha256`` and ``labels``) scored by its ``fold_<k>`` logits. For an
    ensemble, which has no run of its own, these are the metrics of its mean logits, as a single teacher's run logs them."""
    logits = load_teacher_logits(run_ids, sha256)
    binary = len(class_names) == 2
    fold_metrics = [
        classification_metrics(labels[rows], probabilities(logits[f"fold_{k}"][rows], binary), class_names) for k, rows in enumerate(folds)
    ]
    return summarize_folds(list(range(len(folds))), fold_metrics)


def load_teacher_models(run_ids: str, name: str) -> list[keras.Model]:
    """``fold_<k>`` or ``all`` teacher of each member (one for a single teacher run), loaded in Keras safe mode
    (:func:`load_keras_model`); member i > 0 is renamed ``<name>_member_<i>``, so two of one architecture can be nested in one model."""
    models = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, run_id in enumerate(run_ids.split(",")):
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"models/{name}.keras", dst_path=f"{tmp}/{i}")
            model = load_keras_model(path)
            if i:
                model.name = f"{model.name}_member_{i}"
            models.append(model)
    return models


def ensemble_model(members: list[keras.Model]) -> keras.Model:
    """One model whose logits are the mean of the members' logits (the members themselves when there is one)."""
    if len(members) == 1:
        return members[0]
    inputs = keras.Input(members[0].input_shape[1:], name="image")
    outputs = keras.layers.Average(name="mean_logits")([member(inputs) for member in members])
    return keras.Model(inputs, outputs, name="teacher_ensemble")


def load_teacher_model(run_ids: str, name: str) -> keras.Model:
    """``fold_<k>`` or ``all`` teacher of a teacher run, or of an ensemble (comma-separated run ids) the model of
    its members' mean logits (:func:`ensemble_model`), loaded in Keras safe mode."""
    return ensemble_model(load_teacher_models(run_ids, name))
