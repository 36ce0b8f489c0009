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

from pipelines.evaluate import probabilities, pyplot, save_figure

BINS = 15
# The search interval of T (log-spaced): wide enough for any network we train, narrow enough that a degenerate set
# (every image right with huge margins) stops at a finite T instead of running off to infinity or zero.
T_RANGE = (0.05, 20.0)
# Probabilities are clipped here before the log: one confidently wrong image costs -log(1e-12) ~ 27.6, not infinity.
EPS = 1e-12
CALIBRATION_CHOICES = ("temperature", "none")


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


def plot_reliability(ax, probs: np.ndarray, labels: np.ndarray, title: str, bins: int = BINS) -> None:
    """A reliability diagram on ``ax``: accuracy per confidence bin as bars against the diagonal, ECE in the title."""
    table = reliability_bins(probs, labels, bins)
    width = table.edges[1] - table.edges[0]
    filled = table.counts > 0
    ax.bar(table.edges[:-1][filled], table.accuracy[filled], width=width, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top label)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {ece(probs, labels, bins):.3f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)


def reliability_figure(panels: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """One figure with a reliability diagram per named ``(probs, labels)`` panel, side by side, written to ``path``."""
    plt = pyplot()
    columns = max(1, len(panels))
    fig, axes = plt.subplots(1, columns, figsize=(3.2 * columns, 3.4), squeeze=False)
    for ax, (title, (probs, labels)) in zip(axes[0], panels.items()):
        plot_reliability(ax, probs, labels, title)
    return save_figure(fig, path)
