"""Step ``promote``: retrain the study's best student on all training data, compare it on the hold-out split,
register it, and promote it only if it beats the champion and its no-KD twin (the gate: ``registry.gate``; the roles it
moves and the audit trail: ``registry.roles``). It also logs what the report reads back (``registry.evidence``).

A KD student whose no-KD twin (same student and epochs, hard labels only, on all training data) beats it on the
hold-out by more than ``margin`` is registered as challenger, not champion, unless ``force``: the version is complete
and READY, its alias points at a working model, and the audit trail and the promote run (``kd.gate``, ``kd.no_kd_twin``,
both students' ``holdout_*_f1`` metrics) say why. Registering nothing instead would lose the evaluated model the
decision is about; the same registration path as any refused version keeps "no half-registered model": a failure
while the roles move deletes the new version and restores the roles.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import optuna
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.config import BRATS_MODALITIES, PROJECT_ROOT, SERVING_F1_TOLERANCE, Config, PipelineError
from pipelines.evaluation.metrics import (
    CONFUSION_ARTIFACT,
    classification_metrics,
    confusion_matrix,
    confusion_record,
    in_batches,
    model_logits,
    probabilities,
)
from pipelines.log import logger
from pipelines.models.builders import build_student
from pipelines.models.distiller import Distiller
from pipelines.names import Metric, RunTag, VersionTag
from pipelines.steps.prepare import Prepared, prepare_data
from pipelines.steps.teacher import load_teacher_logits, load_teacher_models, train_teacher
from pipelines.tracking.machine import pinned_requirements
from pipelines.tracking.runs import close_stale_runs, tracked_run
from pipelines.training.fit import set_seed, train_on_all_data
from pipelines.training.quantize import fine_tune_qat
from registry.calibrate import calibrate, log_calibration, validation_logits
from registry.card import write_card
from registry.evidence import code_version, log_evidence
from registry.export import format_results, tflite_exports
from registry.gate import Champion, Twin, decide
from registry.model import FORMAT_ARTIFACTS, INPUTS, MAX_BATCH, encode_file, signature
from registry.roles import CHALLENGER, CHAMPION, current_version, record, registry_lock, repair_roles, set_role
from search.space import teacher_config, trial_config
from search.study import best_trial, open_study


@dataclass(frozen=True)
class Promotion:
    """What a promotion did: the version it registered, whether the gate made it champion and why, and both F1 scores."""

    version: str
    promoted: bool
    reason: str
    holdout_f1: float
    champion_f1: float | None


def _student(cfg: Config, prepared: Prepared, teacher_logits: np.ndarray | None, epochs: int, describe: str, prefix: str) -> keras.Model:
    """A student trained on all training data: with the all-data teacher's logits, or without KD (None); with
    kd_mode=consistent, the logits of the teacher's views (cached mode) and consistent batches, as in the search."""
    set_seed(cfg.seed)

    def build_trainer() -> Distiller:
        student = build_student(cfg.student_size, cfg.image_size, prepared.dataset.num_classes, seed=cfg.seed, norm=cfg.student_norm)
        return Distiller(student, None, cfg.temperature, cfg.effective_alpha, prepared.dataset.binary)

    consistent = cfg.kd_mode == "consistent"
    recalibrate = cfg.student_norm == "batch"
    return train_on_all_data(
        prepared, cfg, build_trainer, teacher_logits, epochs, describe, prefix=prefix, consistent=consistent, recalibrate=recalibrate
    )


def _qat_student(cfg: Config, prepared: Prepared, student: keras.Model, teacher_logits: np.ndarray, epochs: int) -> keras.Model:
    """``qat=true``: the all-data KD student fine-tuned with fake quantization under the same loss, on the same images
    with the all-data teacher's logits of them (pipelines.training.quantize.fine_tune_qat, for a fifth of the student's epochs);
    ``pipelines.training.quantize.int8_export`` of it is the INT8 model with the ranges it learnt."""
    set_seed(cfg.seed)
    rows = prepared.splits.train
    labels = prepared.dataset.labels[rows]
    return fine_tune_qat(
        student,
        cfg.replace(epochs=epochs),
        prepared.images[rows],
        labels,
        teacher_logits[rows],
        prefix="qat_all_",
        describe="student (KD, QAT)",
    )


def study_best(cfg: Config) -> tuple[optuna.trial.FrozenTrial, Config, Config]:
    """The study's best trial, the Config of its teachers (the study's, with the trial's teacher of several) and the
    Config of the trial's student."""
    study, study_cfg = open_study(cfg)
    best = best_trial(study)
    return best, teacher_config(study_cfg, best.params), trial_config(study_cfg, best.params)


def holdout_frame(prepared: Prepared) -> pd.DataFrame:
    """The hold-out images as the served model receives them: base64 files (``request_bytes``: a NIfTI slice
    row becomes a one-slice NIfTI file), so the gate and the input example work for every source."""
    return pd.DataFrame({"image": [encode_file(p) for p in prepared.dataset.manifest["path"].to_numpy()[prepared.splits.test]]})


def pyfunc_f1(model: mlflow.pyfunc.PyFuncModel, frame: pd.DataFrame, labels: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Hold-out metrics of a served model, predicted from the image files, so any version is comparable.

    Sent in requests of at most ``MAX_BATCH`` rows, the served model's limit, so a hold-out of any size works.
    """
    output = in_batches(model.predict, frame, MAX_BATCH)
    missing = [f"prob_{name}" for name in class_names if f"prob_{name}" not in output.columns]
    if missing:
        raise PipelineError(f"the model predicts other classes than this data's {class_names}; compare on data with the same classes")
    probs = output[[f"prob_{name}" for name in class_names]].to_numpy()
    return classification_metrics(labels, probs)


def trained_on(dataset) -> str:
    """What the model learnt from, in words: a model of the synthetic set must not pass for one of real scans."""
    if dataset.source == "synthetic":
        return f"the embedded synthetic set ({len(dataset.manifest)} generated slices, not real scans)"
    return f"{dataset.root.name} ({dataset.source}, {len(dataset.manifest)} images)"


def log_student(
    student: keras.Model,
    prepared: Prepared,
    cfg: Config,
    example: pd.DataFrame,
    exports: dict[str, bytes] | None = None,
    serving_format: str = "keras",
    temperature: float = 1.0,
) -> mlflow.models.model.ModelInfo:
    """Log the pyfunc model (student + preprocessing + class names) to the active run, with an input example.

    ``exports``: TFLite flatbuffers by serving format (``tflite-float32``, ``tflite-int8``), carried beside the
    .keras student; ``serving_format``: the one the served model runs (``keras`` or one of them); ``temperature``: what
    every format's logits are divided by before the softmax (``registry.calibrate``; 1 = the probabilities as trained).
    """
    exports = exports or {}
    if serving_format != "keras" and serving_format not in exports:
        raise PipelineError(f"serving_format={serving_format!r}, but only {['keras', *exports]} were exported; export it first")
    with tempfile.TemporaryDirectory() as tmp:
        student_path = Path(tmp) / "student.keras"
        student.save(student_path)
        artifacts = {"student": str(student_path)}
        for name, flatbuffer in exports.items():
            path = Path(tmp) / f"student_{name.removeprefix('tflite-')}.tflite"
            path.write_bytes(flatbuffer)
            artifacts[FORMAT_ARTIFACTS[name]] = str(path)
        metadata_path = Path(tmp) / "metadata.json"
        modality = (
            None if prepared.dataset.modality is None else BRATS_MODALITIES[prepared.dataset.modality]
        )  # what served .h5 slices are read as
        metadata = {
            "image_size": cfg.image_size,
            "class_names": prepared.dataset.class_names,
            "positive_class": prepared.dataset.positive_class,
            "serving_format": serving_format,
            "temperature": float(temperature),
        }
        metadata_path.write_text(json.dumps({**metadata, "modality": modality}))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PROJECT_ROOT / "registry" / "served_model.py"),  # code, not a pickle
            artifacts={**artifacts, "metadata": str(metadata_path)},
            code_paths=[str(PROJECT_ROOT / "pipelines"), str(PROJECT_ROOT / "registry")],
            signature=signature(prepared.dataset.class_names),
            input_example=example,
            pip_requirements=pinned_requirements(),
            metadata={
                "inputs": INPUTS,
                "modality": modality,
                VersionTag.TRAINED_ON: trained_on(prepared.dataset),
                VersionTag.DATA_DIGEST: prepared.dataset.digest,
                VersionTag.SERVING_FORMAT: serving_format,
                VersionTag.TEMPERATURE: float(temperature),
            },
        )
    return info


def choose_serving_format(results: dict[str, dict[str, float]], requested: str = "auto") -> str:
    """The requested format, or for ``auto`` the fastest at batch 1 (p50) among the formats whose hold-out F1 is
    within ``SERVING_F1_TOLERANCE`` of the Keras student's (Keras itself always is)."""
    if requested != "auto":
        return requested
    floor = results["keras"]["f1"] - SERVING_F1_TOLERANCE
    return min((name for name, values in results.items() if values["f1"] >= floor), key=lambda name: results[name]["p50_ms"])


def promote(cfg: Config, under: str | None = None, prepared: Prepared | None = None, launched_run_id: str | None = None) -> Promotion:
    """Final training, hold-out comparison, registration and the promotion gate.

    ``under``: the id of a pipeline run (``main``) this step's run is nested in; ``launched_run_id``: the run ``mlflow
    run`` started for this step, which its run resumes.
    """
    best, teachers_cfg, cfg = study_best(cfg)
    prepared = prepare_data(cfg, reuse=prepared)
    client = MlflowClient()
    epochs = max(1, int(np.median(best.user_attrs.get("best_epochs", [cfg.epochs]))))
    if under:
        mlflow.set_experiment(experiment_id=mlflow.get_run(under).info.experiment_id)
    elif not launched_run_id:  # a launched run is in the experiment `mlflow run` chose
        mlflow.set_experiment(cfg.experiment_name)
    close_stale_runs()
    parent = {"mlflow.parentRunId": under} if under else None
    with tracked_run(cfg, run_name="promote", tags=parent, run_id=None if under else launched_run_id) as run:
        mlflow.set_tags(
            {
                RunTag.STEP: "promote",
                RunTag.STUDY: cfg.study_name,
                RunTag.TRIAL: str(best.number),
                RunTag.DATA_DIGEST: prepared.dataset.digest,
            }
        )
        teacher_run_id = train_teacher(teachers_cfg, prepared, nested=True)  # the search's teachers: found, not retrained
        stored = load_teacher_logits(teacher_run_id, prepared.dataset.manifest["sha256"].to_numpy())
        all_logits = stored["all"]
        # Consistent mode (cached or online in the search) trains the final student on the all-data teacher's cached
        # views: the same loss as running that teacher on each view (tests/test_teachers.py), without mixup.
        kd_logits = stored["views_all"] if cfg.kd_mode == "consistent" else all_logits
        student = _student(cfg, prepared, kd_logits, epochs, "student (KD)", "student_all_")
        qat_student = _qat_student(cfg, prepared, student, all_logits, epochs) if cfg.qat else None
        baseline = _student(cfg.replace(no_kd=True), prepared, None, epochs, "student (no KD)", "no_kd_all_")

        labels, test = prepared.dataset.labels, prepared.splits.test
        holdout_logits = {
            "student": model_logits(student, prepared.images[test]),
            "no_kd": model_logits(baseline, prepared.images[test]),
            "teacher": all_logits[test],
        }
        holdout_probs = {who: probabilities(logits, prepared.dataset.binary) for who, logits in holdout_logits.items()}
        holdout = {who: classification_metrics(labels[test], probs, prepared.dataset.class_names) for who, probs in holdout_probs.items()}
        if qat_student is not None:
            qat_probs = probabilities(model_logits(qat_student, prepared.images[test]), prepared.dataset.binary)
            mlflow.log_metric(Metric.HOLDOUT_QAT_F1, classification_metrics(labels[test], qat_probs)["f1"])
        no_kd_run_id = log_evidence(cfg, prepared, holdout_probs, best.user_attrs.get("mlflow_run_id", ""))
        validation = validation_logits(cfg, prepared, stored, best.user_attrs.get("mlflow_run_id", ""), no_kd_run_id)
        calibration = calibrate(cfg, holdout_logits, labels[test], validation)
        log_calibration(calibration, holdout_logits, labels[test])
        mlflow.log_metrics({f"holdout_{who}_{name}": value for who, metrics in holdout.items() for name, value in metrics.items()})
        # Scope holdout_<who> goes with the metrics holdout_<who>_f1_<class> (fetch prints the student's).
        matrices = {f"holdout_{who}": confusion_matrix(labels[test], p) for who, p in holdout_probs.items()}
        mlflow.log_dict(confusion_record(prepared.dataset.class_names, matrices), CONFUSION_ARTIFACT)
        mlflow.log_metrics(
            {
                "holdout_size": len(test),
                Metric.STUDENT_PARAMS: student.count_params(),
                Metric.KFOLD_F1_MEAN: best.values[0],
                Metric.KFOLD_F1_STD: best.user_attrs.get("f1_std", float("nan")),
            }
        )
        # The twin rule compares like with like: both students' in-process F1 on the same hold-out images. A student
        # trained without KD (alpha = 1) is its own twin; run-to-run noise between the two must not refuse it.
        twin = None if cfg.effective_alpha == 1.0 else Twin(holdout["student"]["f1"], holdout["no_kd"]["f1"])
        # Every serving format of the student, timed and scored on the hold-out as it will run; the model carries them
        # all and serves the chosen one (the gate below scores that one, through the served model).
        exports = tflite_exports(student, prepared, qat_student)
        formats = format_results(student, exports, prepared)
        serving_format = choose_serving_format(formats, cfg.serving_format)
        mlflow.log_metrics(
            {
                key: value
                for name, values in formats.items()
                for key, value in ((Metric.serving_f1(name), values["f1"]), (Metric.serving_p50_ms(name), values["p50_ms"]))
            }
        )
        mlflow.set_tag(RunTag.SERVING_FORMAT, serving_format)
        logger("promote").info(
            f"serving {serving_format} ("
            + ", ".join(f"{name} F1 {v['f1']:.4f} p50 {v['p50_ms']:.2f} ms" for name, v in formats.items())
            + ")"
        )
        if cfg.boxes_dir:  # Grad-CAM on real tumour boxes, beside the centre and brightest-pixel baselines (registry.pointing)
            from registry.pointing import log_pointing_game

            teacher = load_teacher_models(teacher_run_id, "all")[0]
            log_pointing_game(
                cfg.boxes_dir, {"student": student, "teacher": teacher}, prepared.dataset.class_names, prepared.dataset.modality
            )
        frame = holdout_frame(prepared)
        logged = log_student(student, prepared, cfg, frame.head(1), exports, serving_format, calibration.temperatures["student"])
        model_uri = logged.model_uri
        new_f1 = pyfunc_f1(mlflow.pyfunc.load_model(model_uri), frame, labels[test], prepared.dataset.class_names)["f1"]

        description = (
            f"KD student {cfg.student_size} (T={cfg.temperature:.3g}, alpha={cfg.alpha:.3g}) "
            f"from study {cfg.study_name!r} trial {best.number}. "
            f"k-fold F1 {best.values[0]:.4f} ± {best.user_attrs.get('f1_std', float('nan')):.4f}; hold-out F1 {new_f1:.4f} "
            f"(teacher {holdout['teacher']['f1']:.4f}, no-KD {holdout['no_kd']['f1']:.4f}); {student.count_params():,} parameters; "
            f"served as {serving_format}."
        )
        tags = {
            VersionTag.STUDY: cfg.study_name,
            VersionTag.TRIAL: str(best.number),
            VersionTag.KFOLD_F1_MEAN: f"{best.values[0]:.6f}",
            VersionTag.KFOLD_F1_STD: f"{best.user_attrs.get('f1_std', float('nan')):.6f}",
            VersionTag.HOLDOUT_F1: f"{new_f1:.6f}",
            VersionTag.PARAMS_COUNT: str(student.count_params()),
            VersionTag.TEACHER_RUN_ID: teacher_run_id,
            VersionTag.DATA_DIGEST: prepared.dataset.digest,
            VersionTag.CODE_VERSION: code_version(),
            VersionTag.IMAGE_SIZE: str(cfg.image_size),
            VersionTag.TRAINED_ON: trained_on(prepared.dataset),
            VersionTag.SERVING_FORMAT: serving_format,
            VersionTag.INT8: "quantization-aware" if qat_student is not None else "post-training",
            VersionTag.TEMPERATURE: f"{calibration.temperatures['student']:.6f}",
        }
        tags.update({f"holdout_{name}": f"{value:.6f}" for name, value in holdout["student"].items()})
        version = register(client, cfg.model_name, logged, run.info.run_id, tags, description)
        try:  # its model card (registry.card) from everything logged above; its summary becomes the description
            write_card(cfg.model_name, version)
        except BaseException:
            client.delete_model_version(cfg.model_name, version)  # no half-registered model
            raise
        # Gate and roles under one lock: a promotion racing this one sees the champion it leaves behind.
        with registry_lock(cfg.model_name, cfg.storage_url):
            try:
                repair_roles(client, cfg.model_name)
                holder = current_version(client, cfg.model_name, CHAMPION)
                champion = None
                if holder is not None:
                    champion_model = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}/{holder.version}")
                    champion = Champion(holder.version, pyfunc_f1(champion_model, frame, labels[test], prepared.dataset.class_names)["f1"])
                decision = decide(new_f1, champion, cfg.margin, cfg.force, twin)
                set_role(client, cfg.model_name, version, CHAMPION if decision.promote else CHALLENGER)
                record(
                    client,
                    cfg.model_name,
                    "promote" if decision.promote else "challenger",
                    version,
                    champion.version if champion else None,
                    decision.reason,
                )
            except BaseException:
                # No half-registered model: the new version goes, the roles return to what the audit trail says.
                client.delete_model_version(cfg.model_name, version)
                repair_roles(client, cfg.model_name)
                raise
        twin_verdict = "none" if twin is None else "better" if decision.twin_better else "not better"
        mlflow.set_tags(
            {
                RunTag.REGISTERED_VERSION: version,
                RunTag.PROMOTED: str(decision.promote),
                RunTag.GATE: decision.reason,
                RunTag.NO_KD_TWIN: twin_verdict,
            }
        )
    role = "Production (alias champion)" if decision.promote else "Staging (alias challenger)"
    logger("promote").info(f"{cfg.model_name} v{version} -> {role}: {decision.reason}")
    return Promotion(version, decision.promote, decision.reason, new_f1, champion.f1 if champion else None)


def register(
    client: MlflowClient, name: str, logged: mlflow.models.model.ModelInfo, run_id: str, tags: dict[str, str], description: str
) -> str:
    """Register a READY version with its tags and description, or leave nothing behind."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Brain-MRI tumour classifier distilled from a CNN teacher (kd-brain).")
    # MLflow waits for READY itself (up to 300 s) and raises when the version fails or is still pending then; whatever
    # stops the registration (that, an interrupt), a version of this run that is not READY is deleted.
    try:
        version = client.create_model_version(
            name, logged.model_uri, run_id=run_id, tags=tags, description=description, model_id=logged.model_id, await_creation_for=300
        )
    except BaseException:
        for left in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            if left.status != "READY":
                client.delete_model_version(name, left.version)
        raise
    return version.version
