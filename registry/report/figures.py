"""The report's figures, drawn with the evaluation plots of ``pipelines.evaluation.metrics`` (the same confusion matrices
and curves every run logs), three models side by side. Each function writes a PNG and returns its path relative
to the report folder, as the documents cite it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.evaluation.metrics import plot_confusion, plot_curves, pyplot, save_figure
from registry.report.document import num
from registry.report.gather import MODELS, Sources
from registry.report.stats import METRICS


def _save(fig, path: Path) -> str:
    """Write the figure; returns its path relative to the report folder."""
    save_figure(fig, path, dpi=130)
    return f"{path.parent.name}/{path.name}"


def confusion_figure(labels: np.ndarray, probs: dict[str, np.ndarray], class_names: list[str], path: Path) -> str:
    """One confusion matrix per model, side by side."""
    fig, axes = pyplot().subplots(1, len(probs), figsize=(4.2 * len(probs), 3.8))
    for ax, (who, p) in zip(np.ravel(axes), probs.items()):
        plot_confusion(ax, labels, p, class_names, MODELS[who])
    return _save(fig, path)


def curve_figure(kind: str, labels: np.ndarray, probs: dict[str, np.ndarray], holdout: dict[str, dict[str, float]], path: Path) -> str:
    """ROC or PR curves of the three models: the positive class (binary) or micro-averaged one-vs-rest."""
    metric = "roc_auc" if kind == "roc" else "pr_auc"
    curves = {}
    for who, p in probs.items():
        if p.shape[1] == 2:
            truth, score = labels == 1, p[:, 1]
        else:
            truth, score = np.eye(p.shape[1], dtype=bool)[labels].ravel(), p.ravel()
        curves[f"{MODELS[who]} ({METRICS[metric]} {num(holdout[who][metric])})"] = (truth, score)
    fig, ax = pyplot().subplots(figsize=(5, 4.3))
    plot_curves(ax, kind, curves)
    ax.set_title("ROC curves" if kind == "roc" else "Precision-recall curves")
    return _save(fig, path)


def importance_figure(importances: dict[str, float], path: Path) -> str:
    """Bars of the search parameters' importances, the most important on top."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.2))
    names = list(importances)[::-1]
    ax.barh(names, [importances[name] for name in names], color="tab:blue")
    ax.set_xlabel("importance for the objective (PED-ANOVA, as optuna-dashboard)")
    return _save(fig, path)


def gradcam_examples(s: Sources, labels: np.ndarray, probs: np.ndarray) -> list[tuple[str, Path]]:
    """The KD student's most confident hold-out example of each outcome whose file is still there."""
    from pipelines.data.images import row_file

    predicted = probs.argmax(axis=1)
    if probs.shape[1] == 2:
        outcomes = {
            "true positive": (labels == 1) & (predicted == 1),
            "false positive": (labels == 0) & (predicted == 1),
            "false negative": (labels == 1) & (predicted == 0),
            "true negative": (labels == 0) & (predicted == 0),
        }
    else:
        outcomes = {"correct": labels == predicted, "misclassified": labels != predicted}
    paths = s.predictions["path"].map(lambda p: row_file(p).is_file()).to_numpy()
    confidence = probs.max(axis=1)
    examples = []
    for outcome, rows in outcomes.items():
        candidates = np.flatnonzero(rows & paths)
        if candidates.size:
            examples.append((outcome, Path(s.predictions["path"].iloc[candidates[np.argmax(confidence[candidates])]])))
    return examples


def gradcam_figure(s: Sources, examples: list[tuple[str, Path]], path: Path) -> str:
    """Grad-CAM of the registered student and teacher on the given (outcome, scan) examples."""
    from registry.explain import explanation_grid

    return f"{path.parent.name}/{explanation_grid(s.models, examples, path).name}"
