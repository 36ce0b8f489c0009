"""The promotion gate: whether a new version takes the champion's place, and why, from the two hold-out F1 scores.

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
class Decision:
    promote: bool
    reason: str  # recorded in the audit trail and the promote run's kd.gate tag


def decide(new_f1: float, champion: Champion | None, margin: float, force: bool) -> Decision:
    """Promote when there is no champion, when forced, or when ``new_f1`` beats the champion's F1 by more than ``margin``.

    A tie, or a gain of exactly ``margin``, keeps the champion. A score that is not a number cannot be compared: a NaN
    on either side keeps the champion, and a NaN new version does not become the first champion, unless forced.
    """
    if math.isnan(new_f1) and not force:
        return Decision(False, "hold-out F1 is not a number (nan); not promoted without force")
    if champion is None:
        return Decision(True, "no champion yet")
    if force:
        return Decision(True, f"forced (hold-out F1 {new_f1:.4f} vs champion v{champion.version} {champion.f1:.4f})")
    if math.isnan(champion.f1):
        return Decision(
            False, f"hold-out F1 {new_f1:.4f} cannot be compared with champion v{champion.version}, whose F1 is not a number (nan)"
        )
    beats = new_f1 > champion.f1 + margin
    verb = "beats" if beats else "does not beat"
    return Decision(beats, f"hold-out F1 {new_f1:.4f} {verb} champion v{champion.version} {champion.f1:.4f} by more than {margin}")
