"""Calibration: how far a model's probabilities can be taken at their word, and temperature scaling to mend them.

Pure NumPy/SciPy on logits and probabilities, shared by promotion, the report, the model card and ``kd evaluate``.

* ``fit_temperature``: the one scalar T > 0 minimising the negative log-likelihood of ``softmax(logits / T)``
  (``sigmoid(z / T)`` for a single binary logit) on validation logits (Guo et al. 2017, "On calibration of modern
  neural networks"). Dividing every logit by the same positive T never changes the arg-max, so labels stay as
  they were.
* ``ece`` / ``mce``: expected and maximum calibration error of the top label over 15 equal-width confidence bins
  (Guo et al.): the bin-size-weighted mean, and the largest, |accuracy - mean confidence| of the non-empty bins.
* ``brier``: mean over images of sum over classes of (p - one-hot)^2 (Brier 1950's multi-class form; for two
  classes it is twice the positive-class-only score).
* ``nll``: mean negative log-likelihood of the true class (natural log).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.evaluation.metrics import model_logits, probabilities, pyplot, save_figure

# A cross-validation's out-of-fold logits (search trials log them): what a temperature is fitted on, never the hold-out.
OOF_LOGITS_ARTIFACT = "logits/oof_logits.npz"
BINS = 15
# The search interval of T (log-spaced): wide enough for any network we train, narrow enough that a degenerate set
# (every image right with huge margins) stops at a finite T instead of running off to infinity or zero.
T_RANGE = (0.05, 20.0)
# Probabilities are clipped here before the log: one confidently wrong image costs -log(1e-12) ~ 27.6, not infinity.
EPS = 1e-12


def is_binary_logits(logits: np.ndarray) -> bool:
    """A single logit per image (shape ``(N,)`` or ``(N, 1)``): the two-class sigmoid form of our models."""
    logits = np.asarray(logits)
    return logits.ndim == 1 or logits.shape[1] == 1


def scaled_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``(N, C)`` class probabilities of ``logits / temperature``: softmax, or ``[1 - s, s]`` for a single logit."""
    logits = np.asarray(logits, dtype=np.float64)
    return probabilities(logits / float(temperature), is_binary_logits(logits))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class, probabilities clipped at ``EPS``."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=int)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], EPS, 1.0))))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of the squared distance between the probability vector and the one-hot true class."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=int)
    one_hot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-label reliability over equal-width confidence bins: ``edges`` (bins + 1), and per bin the image count,
    mean confidence and accuracy (NaN for an empty bin)."""

    edges: np.ndarray
    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def gaps(self) -> np.ndarray:
        """|accuracy - confidence| of the non-empty bins."""
        filled = self.counts > 0
        return np.abs(self.accuracy[filled] - self.confidence[filled])


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> ReliabilityBins:
    """Images binned by top-label confidence into ``bins`` equal-width bins of [0, 1] (right-closed, so a confidence
    of exactly 1 falls in the last bin and one of 1/bins in the first)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=int)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
    return ReliabilityBins(edges, counts, mean_confidence, accuracy)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: sum over bins of (bin count / N) x |accuracy - mean confidence|."""
    table = reliability_bins(probs, labels, bins)
    filled = table.counts > 0
    return float(np.sum(table.counts[filled] / table.counts.sum() * table.gaps))


def mce(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Maximum calibration error: the largest |accuracy - mean confidence| over the non-empty bins."""
    gaps = reliability_bins(probs, labels, bins).gaps
    return float(gaps.max()) if gaps.size else 0.0


def calibration_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``ece``, ``mce``, ``brier`` and ``nll`` of ``probs`` against integer ``labels``."""
    return {"ece": ece(probs, labels), "mce": mce(probs, labels), "brier": brier(probs, labels), "nll": nll(probs, labels)}


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of ``scaled_probabilities(logits, T)`` on (validation) ``logits``.

    The NLL is convex in 1 / T, so a bounded scalar search over log T finds its minimum within ``T_RANGE``.
    """
    from scipy.optimize import minimize_scalar

    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=int)
    if len(labels) == 0:
        raise ValueError("fitting a temperature needs at least one validation image, got none")
    loss = lambda log_t: nll(scaled_probabilities(logits, float(np.exp(log_t))), labels)
    found = minimize_scalar(loss, bounds=tuple(np.log(T_RANGE)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


Series = tuple[np.ndarray, np.ndarray]  # (probabilities (N, C), integer labels (N,))


def plot_reliability(ax, series: Mapping[str, Series], title: str, bins: int = BINS) -> None:
    """A reliability diagram on ``ax``: accuracy against mean top-label confidence of each non-empty bin, one curve per
    named series (e.g. before and after calibration, ECE in the legend), against the diagonal of perfect calibration."""
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    for name, (probs, labels) in series.items():
        table = reliability_bins(probs, labels, bins)
        filled = table.counts > 0
        ax.plot(
            table.confidence[filled], table.accuracy[filled], marker="o", markersize=3, label=f"{name} (ECE {ece(probs, labels, bins):.3f})"
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top label)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=7)


def reliability_figure(panels: Mapping[str, Mapping[str, Series] | Series], path: Path, bins: int = BINS) -> Path:
    """One figure, a reliability diagram per titled panel side by side, written to ``path``; a panel is one
    ``(probs, labels)`` pair or several named ones (before / after calibration)."""
    plt = pyplot()
    columns = max(1, len(panels))
    fig, axes = plt.subplots(1, columns, figsize=(3.4 * columns, 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        plot_reliability(ax, series if isinstance(series, Mapping) else {"model": series}, title, bins)
    return save_figure(fig, path)


def out_of_fold_logits(models, fold_ids, folds, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each fold model's logits on its own validation rows: ``(rows, fold of each row, logits)``, folds in order.

    ``folds``: the splits' ``(train rows, validation rows)`` per fold entry; a row validated in several repeats comes
    once per repeat (each time from a model that never saw it)."""
    rows, fold, logits = [], [], []
    for k, model in zip(fold_ids, models):
        validation = folds[k][1]
        rows.append(validation)
        fold.append(np.full(len(validation), k))
        logits.append(model_logits(model, images[validation]))
    return np.concatenate(rows), np.concatenate(fold), np.concatenate(logits)


def save_oof_logits(path: Path, sha256: np.ndarray, labels: np.ndarray, fold: np.ndarray, logits: np.ndarray) -> Path:
    """Out-of-fold logits as ``OOF_LOGITS_ARTIFACT`` holds them: keyed by image sha256, with label and fold entry,
    fixed-width strings so that it loads without pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, sha256=np.asarray(sha256).astype("U64"), label=labels, fold=fold, logits=logits)
    return path


def log_oof_logits(prepared, models, fold_ids) -> None:
    """The cross-validation's out-of-fold logits (:func:`out_of_fold_logits` of its fold ``models`` on ``prepared``), logged
    to the active MLflow run as ``OOF_LOGITS_ARTIFACT``: a forward pass of each fold's model, no extra training."""
    import tempfile

    import mlflow

    rows, fold, logits = out_of_fold_logits(models, fold_ids, prepared.splits.folds, prepared.images)
    with tempfile.TemporaryDirectory() as tmp:
        sha256, labels = prepared.dataset.manifest["sha256"].to_numpy()[rows], prepared.dataset.labels[rows]
        path = save_oof_logits(Path(tmp) / Path(OOF_LOGITS_ARTIFACT).name, sha256, labels, fold, logits)
        mlflow.log_artifact(str(path), str(Path(OOF_LOGITS_ARTIFACT).parent))


def load_oof_logits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, labels)`` of a :func:`save_oof_logits` file."""
    with np.load(path, allow_pickle=False) as stored:
        return stored["logits"], stored["label"]
