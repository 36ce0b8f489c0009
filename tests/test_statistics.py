"""The corrected resampled t-test and Holm's correction against examples worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pipelines.evaluation.statistics import corrected_resampled_t_test, holm, kfold_test_train_ratio


def test_corrected_t_test_matches_a_hand_computed_example():
    # 2 repeats x 3 folds. d = a - b = [0.02, 0.05, -0.01, 0.04, 0.03, 0.01]: mean 0.14 / 6 = 0.023333,
    # sample variance 0.0023333 / 5 = 4.6667e-4; corrected by (1/6 + 1/2): 3.1111e-4, sd 0.017638; t = 1.3229, df 5.
    a = [0.82, 0.85, 0.79, 0.84, 0.83, 0.81]
    b = [0.80, 0.80, 0.80, 0.80, 0.80, 0.80]
    result = corrected_resampled_t_test(a, b, kfold_test_train_ratio(3))
    assert result.n == 6 and result.df == 5
    assert result.mean_difference == pytest.approx(0.023333, abs=1e-6)
    assert result.t == pytest.approx(1.3229, abs=1e-4)
    assert result.pvalue == pytest.approx(2 * stats.t.sf(1.3229, 5), abs=1e-4)


def test_corrected_t_test_is_more_cautious_than_the_plain_paired_test():
    a = [0.82, 0.85, 0.79, 0.84, 0.83, 0.81, 0.86, 0.84, 0.85]
    b = [0.80, 0.81, 0.80, 0.79, 0.80, 0.82, 0.80, 0.81, 0.80]
    plain = stats.ttest_rel(a, b)
    corrected = corrected_resampled_t_test(a, b, kfold_test_train_ratio(3))
    assert abs(corrected.t) < abs(plain.statistic) and corrected.pvalue > plain.pvalue
    # with no train/test overlap (ratio 0) it is the plain paired t-test
    assert corrected_resampled_t_test(a, b, 0.0).t == pytest.approx(plain.statistic)


def test_corrected_t_test_is_antisymmetric_and_handles_identical_scores():
    a, b = [0.9, 0.8, 0.85], [0.7, 0.75, 0.8]
    forward, backward = corrected_resampled_t_test(a, b, 0.5), corrected_resampled_t_test(b, a, 0.5)
    assert forward.t == pytest.approx(-backward.t) and forward.pvalue == pytest.approx(backward.pvalue)
    same = corrected_resampled_t_test(a, a, 0.5)
    assert same.t == 0.0 and same.pvalue == 1.0
    shifted = corrected_resampled_t_test([x + 0.1 for x in a], a, 0.5)
    assert math.isinf(shifted.t) and shifted.pvalue == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        corrected_resampled_t_test([0.9], [0.8], 0.5)


def test_holm_matches_a_hand_computed_example():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> raised to 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_never_lowers_a_p_value():
    pvalues = [0.5, 0.2, 0.9, 0.01, 0.3]
    adjusted = holm(pvalues)
    assert all(1.0 >= q >= p for p, q in zip(pvalues, adjusted))
    assert holm([]) == [] and holm([0.04]) == [0.04]


def test_holm_with_tied_p_values_matches_a_hand_computed_example():
    # sorted: 0.001 x 4 = 0.004, 0.02 x 3 = 0.06, 0.02 x 2 = 0.04 -> raised to 0.06, 0.5 x 1 = 0.5; ties share one value
    assert holm([0.02, 0.02, 0.5, 0.001]) == pytest.approx([0.06, 0.06, 0.5, 0.004])


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_images():
    from pipelines.evaluation.statistics import bootstrap_intervals

    rng = np.random.default_rng(0)
    score = lambda labels, probs: {"accuracy": float(np.mean(labels == probs.argmax(axis=1)))}

    def interval(n):
        labels = rng.integers(0, 2, n)
        correct = rng.random(n) < 0.8
        predicted = np.where(correct, labels, 1 - labels)
        return bootstrap_intervals(labels, np.eye(2)[predicted], score, resamples=400, seed=1)["accuracy"]

    small, large = interval(50), interval(2000)
    assert small[0] < 0.8 < small[1] and large[0] < 0.8 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 3
