"""Metrics and evaluation plots, computed from logits the same way for teachers and students."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from pipelines.batches import EVAL_BATCH, in_batches


def model_logits(model, images: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """A Keras model's inference logits for ``images`` (float32), computed :func:`in_batches`.

    Through ``predict_on_batch``, Keras's compiled inference step: the same logits as an eager call (checked), 1.5x
    sooner for the resnet teacher at 32 px, where an eager call dispatches every layer's ops from Python."""
    return in_batches(lambda batch: np.asarray(model.predict_on_batch(batch.astype(np.float32))), images, batch_size)


# Where a run's confusion matrices are logged (see confusion_record); beside the confusion-matrix PNG, if any.
CONFUSION_ARTIFACT = "evaluation/confusion_matrix.json"


def probabilities(logits: np.ndarray, binary: bool) -> np.ndarray:
    """Class probabilities ``(N, C)``; a single logit z becomes ``[1 - s(z), s(z)]``."""
    logits = np.asarray(logits, dtype=np.float64)
    if binary:
        positive = 1.0 / (1.0 + np.exp(-logits.reshape(-1)))
        return np.stack([1.0 - positive, positive], axis=1)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def class_keys(class_names: Sequence[str]) -> list[str]:
    """Each class's name as it appears in metric keys (``f1_<key>``), one per class, all different.

    MLflow keys refuse most punctuation and path-like names, so every character other than an ASCII letter,
    digit, ``_`` or ``-`` becomes ``_``; a name that then equals another class's (``a b`` and ``a_b``) or
    ``macro`` gets its class index appended.
    """
    keys = [re.sub(r"[^A-Za-z0-9_-]", "_", name) or "class" for name in class_names]
    return [f"{key}_{index}" if key == "macro" or keys.count(key) > 1 else key for index, key in enumerate(keys)]


def per_class_f1(matrix: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """``f1_<class key>`` for every class and ``f1_macro`` (their unweighted mean), from a confusion matrix.

    F1 = 2 TP / (2 TP + FP + FN) with rows the true classes; 0 for a class neither present nor predicted.
    ``f1_macro`` averages over every class of the data set, so it can differ from a multi-class ``f1``,
    which averages over the classes present in the labels or predictions, and is another figure than a
    binary ``f1`` (the positive class's alone).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    hits = np.diag(matrix)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)  # 2 TP + FP + FN
    f1 = np.divide(2.0 * hits, denominator, out=np.zeros_like(hits), where=denominator > 0)
    return {**{f"f1_{key}": float(value) for key, value in zip(class_keys(class_names), f1)}, "f1_macro": float(f1.mean())}


def accuracy_and_f1(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """``accuracy``, each class's ``f1_<class key>`` and ``f1_macro`` from one confusion matrix: cheap enough to
    recompute for every bootstrap resample (``pipelines.evaluation.statistics.bootstrap_intervals``)."""
    matrix = confusion_matrix(labels, probs)
    return {"accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)), **per_class_f1(matrix, class_names)}


def confusion_matrix(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Counts of (true class row, arg-max predicted class column), every class present."""
    return skm.confusion_matrix(np.asarray(labels), probs.argmax(axis=1), labels=np.arange(probs.shape[1]))


def confusion_record(class_names: Sequence[str], matrices: dict[str, np.ndarray]) -> dict:
    """Confusion matrices as logged (``confusion_matrix.json``): named scopes, rows true, columns predicted."""
    return {
        "class_names": list(class_names),
        "metric_keys": [f"f1_{key}" for key in class_keys(class_names)],
        "rows": "true class",
        "columns": "predicted class",
        "matrices": {scope: np.asarray(matrix).astype(int).tolist() for scope, matrix in matrices.items()},
    }


def classification_metrics(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """F1, accuracy, precision, recall (sensitivity), specificity, ROC-AUC and PR-AUC.

    Binary: of the positive class (index 1). Multi-class: macro averages (one-vs-rest AUCs).
    Undefined values (an AUC with one class present) are NaN rather than a misleading number.
    With ``class_names``, also each class's F1 and their macro average (:func:`per_class_f1`).
    """
    labels = np.asarray(labels)
    predicted = probs.argmax(axis=1)
    binary = probs.shape[1] == 2
    average = "binary" if binary else "macro"
    result = {
        "f1": skm.f1_score(labels, predicted, average=average, zero_division=0),
        "accuracy": skm.accuracy_score(labels, predicted),
        "precision": skm.precision_score(labels, predicted, average=average, zero_division=0),
        "recall": skm.recall_score(labels, predicted, average=average, zero_division=0),
    }
    matrix = skm.confusion_matrix(labels, predicted, labels=np.arange(probs.shape[1]))
    negatives = matrix.sum() - matrix.sum(axis=0) - matrix.sum(axis=1) + np.diag(matrix)  # true negatives per class
    specificity = negatives / np.maximum(negatives + matrix.sum(axis=0) - np.diag(matrix), 1)
    result["specificity"] = specificity[1] if binary else specificity.mean()
    present = np.unique(labels)
    if present.size == probs.shape[1]:
        if binary:
            result["roc_auc"] = skm.roc_auc_score(labels, probs[:, 1])
            result["pr_auc"] = skm.average_precision_score(labels, probs[:, 1])
        else:
            one_hot = np.eye(probs.shape[1])[labels]
            result["roc_auc"] = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
            result["pr_auc"] = skm.average_precision_score(one_hot, probs, average="macro")
    else:
        result["roc_auc"] = result["pr_auc"] = float("nan")
    if class_names is not None:
        result.update(per_class_f1(matrix, class_names))
    return {key: float(value) for key, value in result.items()}


def write_evaluation_artifacts(
    labels: np.ndarray, probs: np.ndarray, class_names: list[str], out_dir: Path, title: str, matrices: dict[str, np.ndarray] | None = None
) -> list[Path]:
    """Confusion matrix (PNG and ``confusion_matrix.json``), ROC and PR curves (PNG) and a classification report (text) into ``out_dir``.

    The JSON holds ``matrices`` (named scopes, e.g. per fold) when given, else the plotted one as scope ``all``.
    """
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(4.5, 4))
    plot_confusion(ax, labels, probs, class_names, f"{title}: confusion matrix")
    paths.append(save_figure(fig, out_dir / "confusion_matrix.png"))
    record = confusion_record(class_names, matrices or {"all": confusion_matrix(labels, probs)})
    paths.append(out_dir / Path(CONFUSION_ARTIFACT).name)
    paths[-1].write_text(json.dumps(record, indent=1))

    curves = [(1, class_names[1])] if len(class_names) == 2 else list(enumerate(class_names))
    for kind in CURVES:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        plot_curves(ax, kind, {name: (labels == index, probs[:, index]) for index, name in curves})
        ax.set_title(f"{title}: {CURVES[kind][1]} curve")
        paths.append(save_figure(fig, out_dir / f"{kind}_curve.png"))

    report = skm.classification_report(
        labels, probs.argmax(axis=1), labels=np.arange(len(class_names)), target_names=class_names, digits=4, zero_division=0
    )
    (out_dir / "classification_report.txt").write_text(f"{title}\n\n{report}")
    paths.append(out_dir / "classification_report.txt")
    return paths


# The curves plot_curves draws: kind -> (scikit-learn display, name in titles).
CURVES = {"roc": (skm.RocCurveDisplay, "ROC"), "pr": (skm.PrecisionRecallDisplay, "precision-recall")}


def pyplot():
    """matplotlib's pyplot on the Agg backend: figures are only ever written to files (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(ax, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], title: str) -> None:
    """The confusion matrix of arg-max decisions on ``ax``: rows true classes, every class shown, no colour bar."""
    skm.ConfusionMatrixDisplay.from_predictions(
        labels, probs.argmax(axis=1), labels=np.arange(len(class_names)), display_labels=list(class_names), ax=ax, colorbar=False
    )
    ax.set_title(title)


def plot_curves(ax, kind: str, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """ROC (``kind="roc"``) or precision-recall (``"pr"``) curves on ``ax``: one per legend name, from
    (boolean truth, score) pairs. A truth without both values has no curve and is left out."""
    display = CURVES[kind][0]
    for name, (truth, score) in curves.items():
        if np.any(truth) and not np.all(truth):
            display.from_predictions(truth, score, name=name, ax=ax)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out, write (making the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
