"""Calibration math: ECE / MCE / Brier / NLL against hand-worked examples, and temperature scaling on the logits of a
deliberately over-confident model (fitted on validation logits, judged on held-out ones)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.evaluation.calibration import (
    brier,
    calibration_metrics,
    ece,
    fit_temperature,
    mce,
    nll,
    reliability_bins,
    reliability_figure,
    scaled_probabilities,
)


def test_ece_mce_brier_and_nll_match_a_hand_worked_example():
    # four images, two classes; top-label confidences 0.9, 0.9, 0.6, 0.7 (bins [0.8667, 0.9333], [0.5333, 0.6],
    # [0.6667, 0.7333]); the first bin holds two images, one right -> |0.5 - 0.9| = 0.4 weighted 2/4;
    # the 0.6 image is right -> |1 - 0.6| = 0.4 weighted 1/4; the 0.7 image is wrong -> |0 - 0.7| = 0.7 weighted 1/4.
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 0, 0, 0])
    assert ece(probs, labels) == pytest.approx(0.5 * 0.4 + 0.25 * 0.4 + 0.25 * 0.7)
    assert mce(probs, labels) == pytest.approx(0.7)
    # Brier: (0.01 + 0.01) + (0.81 + 0.81) + (0.16 + 0.16) + (0.49 + 0.49) = 2.94, over 4 images
    assert brier(probs, labels) == pytest.approx(2.94 / 4)
    assert nll(probs, labels) == pytest.approx(-np.mean(np.log([0.9, 0.1, 0.6, 0.3])))
    assert set(calibration_metrics(probs, labels)) == {"ece", "mce", "brier", "nll"}


def test_reliability_bins_are_fifteen_equal_width_top_label_bins_with_confidence_one_in_the_last():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    table = reliability_bins(probs, np.array([0, 1, 1]))
    assert len(table.counts) == 15 and table.counts.sum() == 3
    assert table.counts[-1] == 1 and table.accuracy[-1] == 1.0
    # 0.5 sits on the edge 7/15 < 0.5 <= 8/15: bin 7; arg-max of a tie is class 0, wrong for label 1
    assert table.counts[7] == 1 and table.accuracy[7] == 0.0
    assert np.isnan(table.accuracy[0])


def overconfident_logits(rng: np.random.Generator, n: int, classes: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model that is right about 70 % of the time but ``scale`` times surer than it should be."""
    labels = rng.integers(0, classes, n)
    calibrated = rng.normal(0, 1, (n, classes))
    calibrated[np.arange(n), labels] += 1.2
    return calibrated * scale, labels


@pytest.mark.parametrize("classes", [2, 4])
def test_temperature_scaling_lowers_held_out_nll_of_an_overconfident_model_and_keeps_every_label(classes):
    rng = np.random.default_rng(0)
    validation_logits, validation_labels = overconfident_logits(rng, 600, classes, scale=6.0)
    held_out_logits, held_out_labels = overconfident_logits(rng, 600, classes, scale=6.0)
    if classes == 2:  # our binary models emit one logit: the log-odds of class 1
        validation_logits = validation_logits[:, 1:] - validation_logits[:, :1]
        held_out_logits = held_out_logits[:, 1:] - held_out_logits[:, :1]
    temperature = fit_temperature(validation_logits, validation_labels)
    assert 3.0 < temperature < 12.0  # the over-confidence put in was x6
    before = scaled_probabilities(held_out_logits)
    after = scaled_probabilities(held_out_logits, temperature)
    assert nll(after, held_out_labels) < 0.8 * nll(before, held_out_labels)
    assert ece(after, held_out_labels) < ece(before, held_out_labels)
    assert np.array_equal(after.argmax(axis=1), before.argmax(axis=1))


def test_a_well_calibrated_model_keeps_a_temperature_near_one():
    rng = np.random.default_rng(1)
    logits, labels = overconfident_logits(rng, 4000, 3, scale=1.0)
    # drawn from the model's own probabilities, the labels make it calibrated by construction
    probs = scaled_probabilities(logits)
    labels = np.array([rng.choice(3, p=row) for row in probs])
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


def test_reliability_figure_draws_one_panel_per_model(tmp_path):
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    path = reliability_figure({"teacher": (probs, np.array([0, 1])), "student": (probs, np.array([1, 1]))}, tmp_path / "r.png")
    assert path.stat().st_size > 1000
