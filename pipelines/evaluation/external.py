"""External validation, the parts that need no registry: which of a data set's classes are the model's, which of its
images the model has already seen, and the metrics with 95 % bootstrap intervals.

``registry.external`` runs them on a registered version (``kd evaluate``). Calibration figures (``ece``, ``brier``) come
from :mod:`pipelines.evaluation.calibration`, the one definition promotion, the report and the model card share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from pipelines.config import BOOTSTRAP_RESAMPLES, PipelineError, parse_class_map
from pipelines.data.splits import closest_matches
from pipelines.evaluation.calibration import brier, ece
from pipelines.evaluation.metrics import class_keys, per_class_f1
from pipelines.evaluation.statistics import bootstrap_intervals

CONFIDENCE = 0.95


def match_classes(data_classes: Sequence[str], model_classes: Sequence[str], class_map: str = "") -> np.ndarray:
    """The model's class index of each data class (by name, after ``class_map``'s renames).

    Every data class must be one of the model's and every model class must be in the data: otherwise one line names
    both lists and the fix. Renamed data classes that are not in the data are refused too (a typo would pass silently).
    """
    mapping = parse_class_map(class_map)
    stray = sorted(set(mapping) - set(data_classes))
    renamed = [mapping.get(name, name) for name in data_classes]
    unknown = [f"{name}" + (f" (as {new})" if new != name else "") for name, new in zip(data_classes, renamed) if new not in model_classes]
    missing = [name for name in model_classes if name not in renamed]
    if stray or unknown or missing:
        problems = [
            f"class_map names {stray} not in the data" if stray else "",
            f"the model does not know {unknown}" if unknown else "",
            f"the data has no {missing}" if missing else "",
        ]
        raise PipelineError(
            f"the data's classes {list(data_classes)} do not match the model's {list(model_classes)}: "
            f"{'; '.join(p for p in problems if p)}; rename with class_map=data_class:model_class,..."
        )
    return np.asarray([list(model_classes).index(name) for name in renamed], dtype=np.int64)


def training_overlap(manifest: pd.DataFrame, hashes: np.ndarray, training: pd.DataFrame, training_hashes: np.ndarray) -> pd.DataFrame:
    """Images of ``manifest`` (path, sha256) that the version already saw: identical (sha256) or near-identical (the
    perceptual hash ``prepare`` groups duplicates by) to a row of its ``training`` manifest (path, sha256, split).

    One row per overlapping image, indexed by its manifest row: ``path``, ``training_path``, ``training_split``
    (where the version had it: a fold, ``test`` for its own hold-out), ``kind`` and ``distance``.
    """
    found = closest_matches(manifest["sha256"].to_numpy(), hashes, training["sha256"].to_numpy(), training_hashes)
    rows, refs = found["query"].to_numpy(), found["ref"].to_numpy()
    frame = pd.DataFrame(
        {
            "row": rows,
            "path": manifest["path"].to_numpy()[rows],
            "training_path": training["path"].to_numpy()[refs],
            "training_split": training["split"].to_numpy()[refs],
            "kind": found["kind"].to_numpy(),
            "distance": found["distance"].to_numpy(),
        }
    )
    return frame.set_index("row")


def one_vs_rest_auc(truth: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC of ``score`` for the boolean ``truth`` (Mann-Whitney U from average ranks: ties count one half); NaN
    unless both outcomes occur."""
    positives = int(truth.sum())
    negatives = len(truth) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = rankdata(score)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def point_metrics(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """``accuracy``, ``f1_macro``, and per class ``f1_<key>``, ``precision_<key>``, ``recall_<key>``, ``auc_<key>``
    (one-vs-rest), with ``auc_macro`` their mean, of arg-max decisions. Precision and F1 of a class never predicted are
    0, as in ``pipelines.evaluation.metrics``; an AUC without both outcomes is NaN."""
    n_classes = len(class_names)
    predicted = probs.argmax(axis=1)
    matrix = np.bincount(labels * n_classes + predicted, minlength=n_classes**2).reshape(n_classes, n_classes).astype(np.float64)
    hits = np.diag(matrix)
    precision = np.divide(hits, matrix.sum(axis=0), out=np.zeros(n_classes), where=matrix.sum(axis=0) > 0)
    recall = np.divide(hits, matrix.sum(axis=1), out=np.full(n_classes, math.nan), where=matrix.sum(axis=1) > 0)
    aucs = [one_vs_rest_auc(labels == index, probs[:, index]) for index in range(n_classes)]
    result = {"accuracy": float(hits.sum() / max(len(labels), 1)), **per_class_f1(matrix, class_names)}
    for key, p, r, auc in zip(class_keys(class_names), precision, recall, aucs):
        result.update({f"precision_{key}": float(p), f"recall_{key}": float(r), f"auc_{key}": auc})
    result["auc_macro"] = float(np.mean(aucs)) if not np.isnan(aucs).any() else math.nan
    return result


def metrics_with_intervals(
    labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict[str, float]:
    """:func:`point_metrics` with ``<metric>_ci_low`` / ``<metric>_ci_high``: the 95 % percentile bootstrap interval over
    ``resamples`` resamples of the images (NaN resamples, e.g. an AUC of a resample without a class, left out), and
    ``ece`` and ``brier`` of the probabilities (:mod:`pipelines.evaluation.calibration`)."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    result = point_metrics(labels, probs, class_names)
    score = lambda rows_labels, rows_probs: point_metrics(rows_labels, rows_probs, class_names)
    for name, (low, high) in bootstrap_intervals(labels, probs, score, resamples, seed, CONFIDENCE).items():
        result[f"{name}_ci_low"], result[f"{name}_ci_high"] = low, high
    result.update({"ece": ece(probs, labels), "brier": brier(probs, labels)})
    return result
