"""Statistics for comparing cross-validated models: the corrected resampled t-test and Holm's correction.

Scores from the folds of one cross-validation are not independent (every two training sets share most of their
images), so the plain paired t-test on them is too confident. Nadeau and Bengio (2003, "Inference for the
generalization error") inflate the variance of the mean difference by the train/test overlap; Bouckaert and Frank
(2004) use it over r repeats x k folds of cross-validation, the setting of ``repeats`` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CorrectedTTest:
    mean_difference: float
    t: float
    pvalue: float  # two-sided
    n: int  # paired scores (repeats x folds)
    df: int


def corrected_resampled_t_test(a: list[float], b: list[float], test_train_ratio: float) -> CorrectedTTest:
    """Paired scores ``a`` and ``b`` (same repeat and fold at each position); ``test_train_ratio`` = n_test / n_train
    of one split (k-fold: 1 / (k - 1)). t = mean(d) / sqrt((1/n + n_test/n_train) * var(d)), n - 1 degrees of freedom."""
    from scipy import stats

    d = np.subtract(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
    n = len(d)
    if n < 2:
        raise ValueError(f"the corrected t-test needs at least 2 paired scores, got {n}")
    mean, variance = float(d.mean()), float(d.var(ddof=1))
    scale = math.sqrt((1.0 / n + test_train_ratio) * variance)
    if scale == 0.0:  # every pair differs by the same amount: no evidence either way unless that amount is 0
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / scale
    pvalue = float(2.0 * stats.t.sf(abs(t), n - 1)) if math.isfinite(t) else 0.0
    return CorrectedTTest(mean, t, pvalue, n, n - 1)


def kfold_test_train_ratio(folds: int) -> float:
    """n_test / n_train of one k-fold split: one fold against the other k - 1."""
    return 1.0 / (folds - 1)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the order given: the i-th smallest p is multiplied
    by (m - i), and each adjusted p is at least the one before it in sorted order; capped at 1."""
    m = len(pvalues)
    order = np.argsort(pvalues, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted.tolist()


def bootstrap_intervals(
    labels: np.ndarray, probs: np.ndarray, score, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (``level``, two-sided) of every figure ``score(labels, probs)`` returns (a dict),
    over ``resamples`` draws of the images with replacement; a figure undefined in a draw (NaN) is left out of it."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(resamples, len(labels)))
    samples: dict[str, list[float]] = {}
    for rows in draws:
        for name, value in score(labels[rows], probs[rows]).items():
            samples.setdefault(name, []).append(value)
    tail = 100 * (1 - level) / 2
    result = {}
    for name, values in samples.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        result[name] = (
            (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))) if values.size else (math.nan, math.nan)
        )
    return result
