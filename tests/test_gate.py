"""The promotion gate on its own: every case of scores, margin and force, without MLflow or a model."""

from __future__ import annotations

import math

import pytest

from registry.gate import Champion, Twin, decide

CHAMPION = Champion("3", 0.80)


def test_the_first_version_is_promoted_because_there_is_no_champion() -> None:
    decision = decide(0.5, None, margin=0.0, force=False)
    assert decision.promote and decision.reason == "no champion yet"


def test_a_version_that_beats_the_champion_by_more_than_the_margin_is_promoted() -> None:
    decision = decide(0.90, CHAMPION, margin=0.05, force=False)
    assert decision.promote
    assert decision.reason == "hold-out F1 0.9000 beats champion v3 0.8000 by more than 0.05"


def test_a_worse_version_is_refused_and_the_reason_names_both_scores() -> None:
    decision = decide(0.70, CHAMPION, margin=0.0, force=False)
    assert not decision.promote
    assert decision.reason == "hold-out F1 0.7000 does not beat champion v3 0.8000 by more than 0.0"


@pytest.mark.parametrize("new_f1", [0.81, 0.85])
def test_a_gain_within_the_margin_is_refused(new_f1: float) -> None:
    decision = decide(new_f1, CHAMPION, margin=0.05, force=False)
    assert not decision.promote and "does not beat" in decision.reason


@pytest.mark.parametrize(("new_f1", "margin"), [(0.80, 0.0), (0.75, 0.25)])
def test_a_tie_keeps_the_champion(new_f1: float, margin: float) -> None:
    """Equal scores, or a gain of exactly the margin (exact in binary here), are not 'more than' the margin."""
    assert not decide(new_f1, Champion("3", new_f1 - margin), margin=margin, force=False).promote


def test_the_smallest_gain_over_the_margin_promotes() -> None:
    assert decide(math.nextafter(0.80, 1.0), CHAMPION, margin=0.0, force=False).promote


def test_force_promotes_a_worse_version_and_says_so() -> None:
    decision = decide(0.10, CHAMPION, margin=1.0, force=True)
    assert decision.promote
    assert decision.reason == "forced (hold-out F1 0.1000 vs champion v3 0.8000)"


def test_force_without_a_champion_is_the_first_promotion() -> None:
    decision = decide(0.5, None, margin=1.0, force=True)
    assert decision.promote and decision.reason == "no champion yet"


@pytest.mark.parametrize("champion", [None, CHAMPION])
def test_a_new_score_that_is_not_a_number_is_refused(champion: Champion | None) -> None:
    decision = decide(math.nan, champion, margin=0.0, force=False)
    assert not decision.promote and "not a number" in decision.reason


def test_a_champion_score_that_is_not_a_number_keeps_the_champion_unless_forced() -> None:
    broken = Champion("3", math.nan)
    refused = decide(0.99, broken, margin=0.0, force=False)
    assert not refused.promote and "v3" in refused.reason and "not a number" in refused.reason
    assert decide(0.99, broken, margin=0.0, force=True).promote


def test_a_new_score_that_is_not_a_number_is_promoted_only_when_forced() -> None:
    decision = decide(math.nan, CHAMPION, margin=0.0, force=True)
    assert decision.promote and decision.reason.startswith("forced")


BETTER_TWIN = Twin(kd_f1=0.70, no_kd_f1=0.80)


@pytest.mark.parametrize("champion", [None, CHAMPION])
def test_a_kd_student_whose_no_kd_twin_is_better_is_refused_even_as_the_first_champion(champion: Champion | None) -> None:
    decision = decide(0.95, champion, margin=0.05, force=False, twin=BETTER_TWIN)
    assert not decision.promote and decision.twin_better
    assert decision.reason == (
        "its no-KD twin's hold-out F1 0.8000 beats the KD student's 0.7000 by more than 0.05: distillation did not help; "
        "not promoted without force"
    )


@pytest.mark.parametrize("twin", [Twin(0.80, 0.80), Twin(0.80, 0.75), Twin(0.70, 0.75)])
def test_a_twin_no_better_than_the_student_by_more_than_the_margin_leaves_the_champion_rule(twin: Twin) -> None:
    """A tie, a worse twin, or a twin better by exactly the margin (0.70 + 0.05 is 0.75 in binary floating point too)."""
    decision = decide(0.90, CHAMPION, margin=0.05, force=False, twin=twin)
    assert decision == decide(0.90, CHAMPION, margin=0.05, force=False)
    assert decision.promote and not decision.twin_better


def test_force_promotes_past_a_better_twin_and_says_so() -> None:
    first = decide(0.70, None, margin=0.0, force=True, twin=BETTER_TWIN)
    assert first.promote and first.twin_better
    assert (
        first.reason
        == "forced: no champion yet, although its no-KD twin's hold-out F1 0.8000 beats the KD student's 0.7000 by more than 0.0"
    )
    replacing = decide(0.70, CHAMPION, margin=0.0, force=True, twin=BETTER_TWIN)
    assert replacing.promote and replacing.reason.startswith("forced (hold-out F1 0.7000 vs champion v3 0.8000); its no-KD twin's")


@pytest.mark.parametrize("twin", [Twin(0.70, math.nan), Twin(math.nan, 0.70)])
def test_a_twin_comparison_with_a_score_that_is_not_a_number_refuses_unless_forced(twin: Twin) -> None:
    refused = decide(0.90, None, margin=0.0, force=False, twin=twin)
    assert not refused.promote and "cannot be compared with its no-KD twin's" in refused.reason
    assert decide(0.90, None, margin=0.0, force=True, twin=twin).promote


def test_the_twin_rule_checks_the_twin_before_the_champion() -> None:
    """A student that beats the champion but not its own twin stays out: the twin is the harder bar here."""
    decision = decide(0.99, Champion("3", 0.10), margin=0.0, force=False, twin=Twin(0.90, 0.95))
    assert not decision.promote and "no-KD twin" in decision.reason
