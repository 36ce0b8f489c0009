"""Step ``distill``: train the student with knowledge distillation on every fold (or one), or the no-KD baseline.

The teachers come from a finished teacher run with the same data, parameters and code, trained first if there is
none. ``cached`` mode reads the teacher's stored logits; ``online`` runs the teacher on every step.
``kd_mode=consistent`` shows teacher and student the same augmented view (pipelines/training/views.py): the cached logits
of the teacher's views, or, online, the very (mixup) batch the student trains on. ``qat=true`` fine-tunes every fold's
student with fake quantization (pipelines/training/quantize.py) and logs and saves those models beside the float ones.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow

from pipelines.config import Config, distill_params
from pipelines.evaluation.metrics import classification_metrics, model_logits, probabilities, write_evaluation_artifacts
from pipelines.log import logger
from pipelines.models.builders import build_student
from pipelines.models.distiller import Distiller
from pipelines.names import Metric, RunTag
from pipelines.steps.prepare import Prepared, prepare_data
from pipelines.steps.teacher import load_teacher_logits, load_teacher_model, teacher_cv_summary, train_teacher
from pipelines.tracking.locks import teacher_lock
from pipelines.tracking.runs import reuse_finished, step_run
from pipelines.training.crossval import CrossValidation, cross_validate, summarize_folds
from pipelines.training.fit import set_seed
from pipelines.training.quantize import fine_tune_qat


def describe_student(cfg: Config) -> str:
    """How a student is trained, in log lines: alpha = 1 (no_kd, or a search's baseline trial) is the no-KD baseline."""
    if cfg.effective_alpha >= 1.0:
        return f"student {cfg.student_size} (no KD)"
    consistent = {"cached": f", consistent over {cfg.kd_views} views", "online": ", consistent with mixup"}
    consistent = consistent[cfg.teacher_mode] if cfg.kd_mode == "consistent" else ""
    return f"student {cfg.student_size} (KD, T={cfg.temperature:g}, alpha={cfg.alpha:g}, {cfg.teacher_mode}{consistent})"


@dataclass(frozen=True)
class FoldStudent:
    """Fold k's student in its Distiller, with the fold teacher when it runs online: a picklable callable, so fold
    workers (``fold_workers``) can be handed it."""

    cfg: Config
    num_classes: int
    teacher_run_id: str | None

    def __call__(self, k: int) -> Distiller:
        cfg = self.cfg
        student = build_student(cfg.student_size, cfg.image_size, self.num_classes, seed=cfg.seed + k, norm=cfg.student_norm)
        online = self.teacher_run_id and cfg.teacher_mode == "online"
        teacher = load_teacher_model(self.teacher_run_id, f"fold_{k}") if online else None
        return Distiller(student, teacher, cfg.temperature, cfg.effective_alpha, self.num_classes == 2)


def cross_validate_student(
    cfg: Config,
    prepared: Prepared,
    teacher_run_id: str | None,
    fold_ids: list[int],
    on_fold: Callable[[int, dict[str, float]], None] | None = None,
) -> CrossValidation:
    """Train and evaluate the student on the given folds, guided by the fold teachers of ``teacher_run_id``.

    ``teacher_run_id`` is None for the no-KD baseline; for an ensemble its members' run ids joined with commas, whose
    mean logits (cached) or mean model (online) guide the student. Cached mode reads the teacher run's logits once; consistent
    cached mode trains on the views those logits are of, consistent online on fresh views with mixup, the no-KD baseline
    on fresh views, mixed only as the twin of an online student (:func:`mixes_views`).
    """
    dataset = prepared.dataset
    cached = (
        load_teacher_logits(teacher_run_id, dataset.manifest["sha256"].to_numpy())
        if teacher_run_id and cfg.teacher_mode == "cached"
        else {}
    )

    view_logits = (lambda k: cached.get(f"views_fold_{k}")) if cfg.kd_mode == "consistent" else None
    return cross_validate(
        prepared,
        cfg,
        fold_ids,
        FoldStudent(cfg, dataset.num_classes, teacher_run_id),
        lambda k: cached.get(f"fold_{k}"),
        describe_student(cfg),
        on_fold,
        view_logits,
        recalibrate=cfg.student_norm == "batch",
        mix=mixes_views(cfg),
    )


def mixes_views(cfg: Config) -> bool:
    """Whether a student's training views are mixed by mixup: with consistent KD from an online teacher, which runs on the
    very mixed batch, and for that student's no-KD twin, trained as it is but for the teacher. Never beside a cached
    teacher, whose logits are of unmixed views: a twin mixed there was handicapped (on the 4-class set, 9 folds, the small
    no-KD twin scored 0.654 with mixup against 0.708 without it), which read as a KD gain."""
    return cfg.kd_mode == "consistent" and cfg.teacher_mode == "online"


def quantization_aware_folds(
    cfg: Config, prepared: Prepared, teacher_run_id: str | None, cv: CrossValidation
) -> tuple[list[keras.Model], dict[str, float]]:
    """``qat=true``: each fold's trained student fine-tuned with fake quantization (:func:`pipelines.training.quantize.fine_tune_qat`)
    on its fold's training images under the same KD loss, guided by the same fold teacher (its cached logits of the plain
    images, or the model online), and evaluated on the fold's validation images like the student. Returns the QAT models
    and their metrics as ``qat_<metric>`` (``qat_f1_mean``, ``qat_f1_fold_<k>``, ...)."""
    dataset, images = prepared.dataset, prepared.images
    online = bool(teacher_run_id) and cfg.teacher_mode == "online"
    cached = load_teacher_logits(teacher_run_id, dataset.manifest["sha256"].to_numpy()) if teacher_run_id and not online else {}
    models, fold_metrics = [], []
    for k, student, float_metrics in zip(cv.fold_ids, cv.models, cv.fold_metrics):
        train_rows, val_rows = prepared.splits.folds[k]
        logits = cached.get(f"fold_{k}")
        set_seed(cfg.seed + k)
        qat = fine_tune_qat(
            student,
            cfg,
            images[train_rows],
            dataset.labels[train_rows],
            None if logits is None else logits[train_rows],
            load_teacher_model(teacher_run_id, f"fold_{k}") if online else None,
            prefix=f"qat_fold_{k}_",
            describe=f"{describe_student(cfg)} fold {k} QAT",
        )
        probs = probabilities(model_logits(qat, images[val_rows]), dataset.binary)
        fold_metrics.append(classification_metrics(dataset.labels[val_rows], probs, dataset.class_names))
        logger().info(f"{describe_student(cfg)}: fold {k} QAT F1 {fold_metrics[-1]['f1']:.4f} (float {float_metrics['f1']:.4f})")
        models.append(qat)
    summary = summarize_folds(cv.fold_ids, fold_metrics)
    return models, {f"{Metric.QAT_PREFIX}{name}": value for name, value in summary.items()}


def distill(cfg: Config, prepared: Prepared | None = None, nested: bool = False, launched_run_id: str | None = None) -> str:
    """Cross-validated KD (or no-KD) student training; returns the run id with ``f1_mean``, ``f1_std``, ``student_params``.

    A finished distill run with the same data, parameters and code fingerprint is reused. ``launched_run_id``: the run
    ``mlflow run`` started for this step, which its run resumes (resolved once, in :func:`kd.cli.run_command`).
    """
    prepared = prepared or prepare_data(cfg)
    dataset = prepared.dataset
    previous = reuse_finished("distill", cfg, distill_params(cfg), dataset.digest, nested, launched_run_id)
    if previous:
        return previous
    alpha = cfg.effective_alpha
    fold_ids = list(range(cfg.fold_count)) if cfg.fold < 0 else [cfg.fold]
    describe = describe_student(cfg)

    with step_run("distill", cfg, distill_params(cfg), dataset, prepared.splits, nested, launched_run_id) as run:
        teacher_run_id = None
        if alpha < 1.0:
            with teacher_lock(cfg):  # runs started together train the teachers once; the others wait and reuse them
                teacher_run_id = train_teacher(cfg, prepared, nested=True)
        if teacher_run_id:
            mlflow.set_tag(RunTag.TEACHER_RUN_ID, teacher_run_id)
        if teacher_run_id and "," in teacher_run_id:  # the ensemble has no run of its own: its cross-validation is logged here
            folds = [val for _, val in prepared.splits.folds]
            ensemble = teacher_cv_summary(teacher_run_id, dataset.manifest["sha256"].to_numpy(), dataset.labels, folds, dataset.class_names)
            mlflow.log_metrics({f"teacher_{name}": value for name, value in ensemble.items()})
        cv = cross_validate_student(cfg, prepared, teacher_run_id, fold_ids)
        summary = cv.summary()
        student_params = cv.models[0].count_params()
        mlflow.set_tag(RunTag.MINORITY_CLASS, prepared.minority)
        mlflow.log_metrics(
            {**summary, **cv.minority_summary(dataset.class_names, prepared.minority), Metric.STUDENT_PARAMS: student_params}
        )
        qat_models, qat_summary = quantization_aware_folds(cfg, prepared, teacher_run_id, cv) if cfg.qat else ([], {})
        mlflow.log_metrics(qat_summary)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            (out / "models").mkdir()
            for k, model in zip(fold_ids, cv.models):
                model.save(out / "models" / f"student_fold_{k}.keras")
            for k, model in zip(fold_ids, qat_models):
                model.save(out / "models" / f"student_qat_fold_{k}.keras")
            labels = dataset.labels[cv.oof_rows]
            write_evaluation_artifacts(
                labels, cv.oof_probs, dataset.class_names, out / "evaluation", f"{describe}, out-of-fold", cv.confusion_matrices()
            )
            mlflow.log_artifacts(tmp)
        logger().info(
            f"{describe}: F1 {summary[Metric.F1_MEAN]:.4f} ± {summary[Metric.F1_STD]:.4f} over {len(fold_ids)} fold(s), "
            f"{student_params:,} parameters"
            + (f"; QAT F1 {qat_summary[Metric.QAT_F1_MEAN]:.4f}" if qat_summary else "")
            + f", run {run.info.run_id}"
        )
        return run.info.run_id
