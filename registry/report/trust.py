"""The report's calibration results (the table and the reliability diagrams promote logged, ``registry.calibrate``)
and the link to the version's model card (``registry.card``), written beside the report."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow

from pipelines.names import Metric
from registry.calibrate import MODELS, RELIABILITY_ARTIFACT
from registry.report.document import Block, Code, Figure, num, para, table
from registry.report.gather import Sources

NAMES = {"ece": "ECE", "mce": "MCE", "brier": "Brier", "nll": "NLL"}


def calibration_numbers(s: Sources) -> dict[str, dict[str, float]]:
    """Per model: its temperature and hold-out figures as trained and calibrated, as promote logged them (empty when it did not)."""
    m = s.promote.data.metrics
    if Metric.TEMPERATURE not in m:
        return {}
    numbers = {}
    for who in MODELS:
        numbers[who] = {"temperature": m.get(Metric.temperature(who), float("nan"))}
        for name in Metric.CALIBRATION:
            numbers[who][name] = m.get(Metric.calibration(who, name), float("nan"))
            numbers[who][f"{name}_calibrated"] = m.get(Metric.calibration(who, name, calibrated=True), float("nan"))
    return numbers


def calibration_result(s: Sources, out_dir: Path) -> list[Block]:
    """The calibration table (each model's temperature, ECE, MCE, Brier and NLL before and after) and the reliability
    diagrams, or why there are none."""
    numbers = calibration_numbers(s)
    if not numbers:
        return [para("Calibration: not recorded for this version (promoted before calibration was logged); promote it again.")]
    calibrated = s.promote.data.params.get("calibration", "temperature") == "temperature"
    header = ["model", "temperature"] + [f"{label} as trained" for label in NAMES.values()]
    header += [f"{label} calibrated" for label in NAMES.values()] if calibrated else []
    rows = []
    for who, title in MODELS.items():
        row = [title, num(numbers[who]["temperature"])] + [num(numbers[who][name]) for name in NAMES]
        rows.append(row + ([num(numbers[who][f"{name}_calibrated"]) for name in NAMES] if calibrated else []))
    blocks: list[Block] = [
        table(
            "calibration",
            "Calibration on the hold-out split: temperature T fitted per model by minimum negative log-likelihood on its "
            "out-of-fold validation logits (never the hold-out), and the expected and maximum calibration errors (15 equal-width "
            "bins of top-label confidence), Brier score and negative log-likelihood of softmax(z) as trained"
            + (" and of softmax(z / T) calibrated." if calibrated else " (calibration=none: no temperature applied)."),
            header,
            rows,
        )
    ]
    figure = out_dir / "figures" / "reliability.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            shutil.copy(
                mlflow.artifacts.download_artifacts(run_id=s.promote.info.run_id, artifact_path=RELIABILITY_ARTIFACT, dst_path=tmp), figure
            )
        except Exception:  # MLflow raises several types for a missing artifact
            return blocks
    blocks.append(
        Figure(
            "reliability",
            f"{figure.parent.name}/{figure.name}",
            "Reliability diagrams on the hold-out split: accuracy against mean confidence per confidence bin, as trained and "
            "calibrated; the diagonal is perfect calibration.",
        )
    )
    return blocks


def card_result(s: Sources, out_dir: Path) -> Block:
    """The version's model card, generated into the report folder (as ``kd card`` writes it), and a line linking it."""
    from registry.card import CARD_ARTIFACT, gather_card, render_card

    (out_dir / CARD_ARTIFACT).write_text(render_card(gather_card(s.version)))
    return para(
        "Model card: ",
        Code(CARD_ARTIFACT),
        " beside this report, generated from the same store; ",
        Code(f"kd card --model_name {s.model_name} --version {s.version.version}"),
        f" refreshes it after a new evaluation and logs it to the version's run {s.version.run_id}.",
    )
