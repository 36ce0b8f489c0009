"""The promotion gate: whether a new version takes the champion's place, and why, from the hold-out F1 scores of the
new version, the champion and the new version's no-KD twin.

Pure (no MLflow, no models), so every case is tested directly; ``promote`` measures the scores and applies the decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Champion:
    """The current champion as the gate sees it: its version and its F1 on the same hold-out images."""

    version: str
    f1: float


@dataclass(frozen=True)
class Twin:
    """The candidate and its no-KD twin (same student, data and epochs, hard labels only), scored the same way on
    the same hold-out images: whether distillation helped at all."""

    kd_f1: float
    no_kd_f1: float


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str  # recorded in the audit trail and the promote run's kd.gate tag
    twin_better: bool = False  # the no-KD twin beat the candidate by more than the margin, or could not be compared


def decide(new_f1: float, champion: Champion | None, margin: float, force: bool, twin: Twin | None = None) -> Decision:
    """Promote when there is no champion, when forced, or when ``new_f1`` beats the champion's F1 by more than ``margin``.

    A tie, or a gain of exactly ``margin``, keeps the champion. A score that is not a number cannot be compared: a NaN
    on either side keeps the champion, and a NaN new version does not become the first champion, unless forced.

    ``twin``: a KD student's no-KD twin. A twin whose F1 beats the student's by more than ``margin`` (or that cannot be
    compared, a NaN on either side) refuses the student even as the first champion, unless forced: a distilled model
    worse than training without the teacher is not worth serving. None: no twin to compare with (a student trained
    without KD is its own twin).
    """
    if math.isnan(new_f1) and not force:
        return Decision(False, "hold-out F1 is not a number (nan); not promoted without force")
    against = _twin_better(twin, margin)
    if against and not force:
        return Decision(False, f"{against}: distillation did not help; not promoted without force", twin_better=True)
    twin_better = against is not None
    if champion is None:
        return Decision(True, f"forced: no champion yet, although {against}" if against else "no champion yet", twin_better)
    if force:
        suffix = f"; {against}" if against else ""
        return Decision(True, f"forced (hold-out F1 {new_f1:.4f} vs champion v{champion.version} {champion.f1:.4f}){suffix}", twin_better)
    if math.isnan(champion.f1):
        return Decision(
            False, f"hold-out F1 {new_f1:.4f} cannot be compared with champion v{champion.version}, whose F1 is not a number (nan)"
        )
    beats = new_f1 > champion.f1 + margin
    verb = "beats" if beats else "does not beat"
    return Decision(beats, f"hold-out F1 {new_f1:.4f} {verb} champion v{champion.version} {champion.f1:.4f} by more than {margin}")


def _twin_better(twin: Twin | None, margin: float) -> str | None:
    """Why the no-KD twin counts as better (beats the student by more than ``margin``, or a NaN leaves distillation
    unproven), or None when the student holds its own or has no twin."""
    if twin is None or twin.no_kd_f1 <= twin.kd_f1 + margin:
        return None
    if math.isnan(twin.no_kd_f1) or math.isnan(twin.kd_f1):
        return f"the KD student's hold-out F1 {twin.kd_f1:.4f} cannot be compared with its no-KD twin's {twin.no_kd_f1:.4f}"
    return f"its no-KD twin's hold-out F1 {twin.no_kd_f1:.4f} beats the KD student's {twin.kd_f1:.4f} by more than {margin}"
