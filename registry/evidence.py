"""What ``promote`` logs so a report can be written later from the store alone: per-image hold-out probabilities
(for bootstrap intervals, confusion matrices, curves), a no-KD cross-validation of the trial's student on the same
folds (for the paired test), the KD student's hold-out bootstrap intervals (for its model card), the software and
hardware it ran on, the pinned requirements and the code version.

The artifact and tag names here are the contract with ``registry.report``, which reads them back and trains nothing.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import mlflow
import numpy as np

from pipelines.config import PROJECT_ROOT, Config
from pipelines.names import RunTag
from pipelines.tracking.machine import describe_machine

if TYPE_CHECKING:
    from pipelines.steps.prepare import Prepared

PREDICTIONS_ARTIFACT = "evaluation/holdout_predictions.csv"
ENVIRONMENT_ARTIFACT = "environment.json"
# Every image of the version's data set (path, sha256, split) with its perceptual hash (hex): what ``kd evaluate`` checks
# external data against, wherever it runs (the training files themselves need not be there).
TRAINING_HASHES_ARTIFACT = "data/training_hashes.csv"


def log_evidence(cfg: Config, prepared: Prepared, probs: dict[str, np.ndarray], trial_run_id: str) -> str:
    """Log to the active promote run what the report reads back; returns the no-KD cross-validation run id.

    ``probs``: hold-out class probabilities of ``teacher``, ``student`` and ``no_kd``. The no-KD student of the
    trial's configuration is cross-validated on the same folds with the same seeds (a finished run is reused).
    """
    # Imported here: the report reads this module's names without loading the training code (and TensorFlow).
    from pipelines.steps.distill import distill

    test = prepared.splits.test
    log_intervals(prepared.dataset.labels[test], probs["student"], prepared.dataset.class_names, "holdout_student_")
    frame = prepared.dataset.manifest.iloc[test][["path", "sha256", "label"]].reset_index(drop=True)
    for who, values in probs.items():
        for index, name in enumerate(prepared.dataset.class_names):
            frame[f"{who}_prob_{name}"] = values[:, index]
    mlflow.log_text(frame.to_csv(index=False), PREDICTIONS_ARTIFACT)
    mlflow.log_dict(describe_machine(), ENVIRONMENT_ARTIFACT)
    log_training_hashes(prepared)
    # Not quantization-aware: the trial runs it is paired with are the search's float students.
    no_kd_run_id = distill(cfg.replace(no_kd=True, qat=False), prepared, nested=True)
    mlflow.set_tags({RunTag.NO_KD_CV_RUN_ID: no_kd_run_id, RunTag.TRIAL_RUN_ID: trial_run_id})
    return no_kd_run_id


def log_training_hashes(prepared: Prepared) -> None:
    """The version's data manifest with each image's perceptual hash, to the active run (``TRAINING_HASHES_ARTIFACT``)."""
    from pipelines.data.splits import hash_text, perceptual_hashes

    table = prepared.splits.table(prepared.dataset)[["path", "sha256", "split"]]
    table["phash"] = hash_text(perceptual_hashes(prepared.images))
    mlflow.log_text(table.to_csv(index=False), TRAINING_HASHES_ARTIFACT)


# Bootstrap resamples of the hold-out intervals promote logs (holdout_student_<figure>_ci_low / _ci_high), and their seed.
INTERVAL_RESAMPLES, INTERVAL_SEED = 1000, 0


def log_intervals(labels: np.ndarray, probs: np.ndarray, class_names: list[str], prefix: str = "") -> dict[str, tuple[float, float]]:
    """95 % bootstrap intervals of accuracy, macro-F1 and each class's F1, logged as ``<prefix><figure>_ci_low`` and
    ``_ci_high`` to the active run (``holdout_student_f1_macro_ci_low``; an evaluate run's bare ``f1_macro_ci_low``)."""
    from pipelines.evaluation.metrics import accuracy_and_f1
    from pipelines.evaluation.statistics import bootstrap_intervals

    score = lambda rows_labels, rows_probs: accuracy_and_f1(rows_labels, rows_probs, class_names)
    intervals = bootstrap_intervals(labels, probs, score, INTERVAL_RESAMPLES, INTERVAL_SEED)
    mlflow.log_metrics(
        {f"{prefix}{name}_ci_{end}": value for name, (low, high) in intervals.items() for end, value in (("low", low), ("high", high))}
    )
    return intervals


def code_version() -> str:
    """The git commit the code ran from (``-dirty`` with uncommitted changes to tracked files), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
