"""Promote's calibration (``calibration=temperature|none``): one temperature per model, fitted by minimum NLL on that
model's out-of-fold validation logits, never on the hold-out, and the hold-out calibration figures before and after.

Where each model's validation logits come from, so that nothing is trained again:

* teacher: its run's cached ``fold_<k>`` logits (the fold teachers', for an ensemble their mean) on fold k's
  validation rows;
* KD student: the best search trial's ``logits/oof_logits.npz`` (its fold students on their validation rows); a trial
  logged before trials kept them has its configuration cross-validated by a ``distill`` run (reused when one exists),
  whose fold students give them;
* no-KD twin: the fold students of the no-KD cross-validation run promote already pairs the KD student with
  (``registry.evidence``: same student configuration, folds and seeds, hard labels only).

The temperature fitted on a cross-validation's fold models is applied to the model trained on all training data with
the same configuration: the standard cross-validated calibration, as no validation rows are left once it trains on all.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np

from pipelines.config import Config
from pipelines.evaluation.calibration import (
    OOF_LOGITS_ARTIFACT,
    calibration_metrics,
    fit_temperature,
    load_oof_logits,
    out_of_fold_logits,
    reliability_figure,
    scaled_probabilities,
)
from pipelines.log import logger
from pipelines.names import Metric

if TYPE_CHECKING:  # the card and the report read MODELS without loading TensorFlow
    from pipelines.steps.prepare import Prepared

# The models promote compares, in the order the figure and the tables show them.
MODELS = {"teacher": "Teacher", "student": "KD student", "no_kd": "No-KD student"}
RELIABILITY_ARTIFACT = "evaluation/reliability.png"


@dataclass(frozen=True)
class Calibration:
    """Per model (keys of :data:`MODELS`): its temperature, its hold-out ``ece``/``mce``/``brier``/``nll`` before and
    after, and in words where its validation logits came from."""

    method: str  # temperature or none
    temperatures: dict[str, float]
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    sources: dict[str, str]


def teacher_validation_logits(stored: dict[str, np.ndarray], prepared: Prepared, fold_count: int) -> tuple[np.ndarray, np.ndarray]:
    """The fold teachers' cached logits on their own validation rows, with the rows' labels."""
    rows = [prepared.splits.folds[k][1] for k in range(fold_count)]
    logits = np.concatenate([stored[f"fold_{k}"][validation] for k, validation in enumerate(rows)])
    return logits, prepared.dataset.labels[np.concatenate(rows)]


def fold_model_logits(run_id: str, prepared: Prepared, fold_count: int) -> tuple[np.ndarray, np.ndarray]:
    """The out-of-fold logits of a ``distill`` run's fold students (``models/student_fold_<k>.keras``), with labels."""
    from pipelines.models.builders import load_keras_model

    with tempfile.TemporaryDirectory() as tmp:
        models = [
            load_keras_model(
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"models/student_fold_{k}.keras", dst_path=tmp)
            )
            for k in range(fold_count)
        ]
    rows, _, logits = out_of_fold_logits(models, range(fold_count), prepared.splits.folds, prepared.images)
    return logits, prepared.dataset.labels[rows]


def trial_validation_logits(trial_run_id: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The out-of-fold logits a search trial logged, or None for a trial logged before trials kept them."""
    if not trial_run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=trial_run_id, artifact_path=OOF_LOGITS_ARTIFACT, dst_path=tmp)
        except Exception:  # MLflow raises several types for a missing artifact
            return None
        return load_oof_logits(Path(path))


def validation_logits(
    cfg: Config, prepared: Prepared, stored_teacher: dict[str, np.ndarray], trial_run_id: str, no_kd_run_id: str
) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """Each model's out-of-fold validation ``(logits, labels, where from)``; ``cfg`` is the trial's student configuration."""
    found = {"teacher": (*teacher_validation_logits(stored_teacher, prepared, cfg.fold_count), "the fold teachers' cached logits")}
    trial = trial_validation_logits(trial_run_id)
    if trial is not None:
        found["student"] = (*trial, f"the fold students of search trial run {trial_run_id}")
    else:
        from pipelines.steps.distill import distill

        run_id = distill(cfg.replace(qat=False), prepared, nested=True)
        found["student"] = (*fold_model_logits(run_id, prepared, cfg.fold_count), f"the fold students of distill run {run_id}")
    found["no_kd"] = (*fold_model_logits(no_kd_run_id, prepared, cfg.fold_count), f"the fold students of no-KD run {no_kd_run_id}")
    return found


def calibrate(
    cfg: Config,
    holdout_logits: dict[str, np.ndarray],
    holdout_labels: np.ndarray,
    validation: dict[str, tuple[np.ndarray, np.ndarray, str]],
) -> Calibration:
    """Fit each model's temperature on its validation logits (1 with ``calibration=none``) and score its hold-out
    probabilities before and after."""
    temperatures, before, after = {}, {}, {}
    for who in MODELS:
        logits, labels, _ = validation[who]
        temperatures[who] = fit_temperature(logits, labels) if cfg.calibration == "temperature" else 1.0
        before[who] = calibration_metrics(scaled_probabilities(holdout_logits[who]), holdout_labels)
        after[who] = calibration_metrics(scaled_probabilities(holdout_logits[who], temperatures[who]), holdout_labels)
    return Calibration(cfg.calibration, temperatures, before, after, {who: validation[who][2] for who in MODELS})


def log_calibration(calibration: Calibration, holdout_logits: dict[str, np.ndarray], holdout_labels: np.ndarray) -> None:
    """Log to the active promote run: per model ``holdout_<who>_<ece|mce|brier|nll>`` (as trained),
    ``..._calibrated`` (after, with ``calibration=temperature``) and ``<who>_temperature``; the promoted student's figures
    as served under the bare ``ece``, ``mce``, ``brier``, ``nll`` and ``temperature``; the reliability diagrams."""
    calibrated = calibration.method == "temperature"
    metrics = {}
    for who in MODELS:
        metrics[Metric.temperature(who)] = calibration.temperatures[who]
        metrics |= {Metric.calibration(who, name): value for name, value in calibration.before[who].items()}
        if calibrated:
            metrics |= {Metric.calibration(who, name, calibrated=True): value for name, value in calibration.after[who].items()}
    metrics |= {**calibration.after["student"], Metric.TEMPERATURE: calibration.temperatures["student"]}
    mlflow.log_metrics(metrics)
    mlflow.log_param("calibration", calibration.method)
    panels = {}
    for who, title in MODELS.items():
        raw = scaled_probabilities(holdout_logits[who])
        series = {"as trained": (raw, holdout_labels)}
        if calibrated:
            series[f"T = {calibration.temperatures[who]:.3g}"] = (
                scaled_probabilities(holdout_logits[who], calibration.temperatures[who]),
                holdout_labels,
            )
        panels[title] = series
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifact(
            str(reliability_figure(panels, Path(tmp) / Path(RELIABILITY_ARTIFACT).name)), str(Path(RELIABILITY_ARTIFACT).parent)
        )
    logger("promote").info(
        "calibration ("
        + calibration.method
        + "): "
        + "; ".join(
            f"{MODELS[who]} T {calibration.temperatures[who]:.3f} hold-out ECE {calibration.before[who]['ece']:.4f} -> "
            f"{calibration.after[who]['ece']:.4f}"
            for who in MODELS
        )
    )
