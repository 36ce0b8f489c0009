"""Calibration at promotion and the model card, for real: a tiny search and promotion on real scans, the temperature
fitted on the trial's out-of-fold logits, the served pyfunc's probabilities softmax(logits / T) in every format, and a
card whose every figure is a logged metric, before and after an external validation and a pointing game are logged."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from kdtest import MODEL, assert_calibration_table, tiny_config, tracking_at
from mlflow import MlflowClient

from pipelines.evaluation.calibration import OOF_LOGITS_ARTIFACT, fit_temperature, load_oof_logits, scaled_probabilities
from pipelines.evaluation.metrics import class_keys, model_logits
from pipelines.names import Metric, RunTag, VersionTag
from registry.calibrate import MODELS, RELIABILITY_ARTIFACT
from registry.card import CARD_ARTIFACT, description, read_card
from registry.model import StudentClassifier

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def promoted(mri_subset, tmp_path_factory):
    """A tracking store with a finished tiny search and one promoted version."""
    from registry.promote import promote
    from search.tune import run_search

    root = tmp_path_factory.mktemp("card")
    with tracking_at(f"sqlite:///{root / 'mlflow.db'}"):
        cfg = tiny_config(mri_subset, root, study_name="card-test")
        run_search(cfg)
        promotion = promote(cfg)
        version = MlflowClient().get_model_version(MODEL, promotion.version)
        yield SimpleNamespace(root=root, cfg=cfg, version=version, run=MlflowClient().get_run(version.run_id))


def test_promote_fits_each_temperature_on_out_of_fold_logits_and_logs_the_figures_before_and_after(promoted):
    metrics = promoted.run.data.metrics
    trial_run_id = promoted.run.data.tags[RunTag.TRIAL_RUN_ID]
    path = mlflow.artifacts.download_artifacts(run_id=trial_run_id, artifact_path=OOF_LOGITS_ARTIFACT, dst_path=str(promoted.root / "oof"))
    logits, labels = load_oof_logits(Path(path))
    assert len(labels) == 19, "every training image once, from the fold student that never saw it (24 scans, 5 held out)"
    assert metrics[Metric.temperature("student")] == pytest.approx(fit_temperature(logits, labels), rel=1e-9)
    for who in MODELS:
        assert metrics[Metric.temperature(who)] > 0
        for name in Metric.CALIBRATION:
            assert math.isfinite(metrics[Metric.calibration(who, name)]) and math.isfinite(metrics[Metric.calibration(who, name, True)])
    # the contract keys: the promoted student as it is served
    assert metrics[Metric.TEMPERATURE] == metrics[Metric.temperature("student")]
    for name in Metric.CALIBRATION:
        assert metrics[name] == metrics[Metric.calibration("student", name, calibrated=True)]
    assert 0 <= metrics[Metric.ECE] <= metrics[Metric.MCE] <= 1
    assert promoted.run.data.params["calibration"] == "temperature"
    artifacts = {a.path for a in MlflowClient().list_artifacts(promoted.run.info.run_id, "evaluation")}
    assert RELIABILITY_ARTIFACT in artifacts
    assert float(promoted.version.tags[VersionTag.TEMPERATURE]) == pytest.approx(metrics[Metric.TEMPERATURE], abs=1e-6)


def test_the_served_model_returns_softmax_of_its_logits_over_the_temperature_with_labels_unchanged(promoted, mri_subset):
    from registry.export import load_student
    from registry.model import encode_file

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{promoted.version.version}")
    wrapper = model.unwrap_python_model()
    temperature = promoted.run.data.metrics[Metric.TEMPERATURE]
    assert wrapper.temperature == pytest.approx(temperature, rel=1e-12) and temperature != 1.0
    frame = pd.DataFrame({"image": [encode_file(path) for path in sorted(mri_subset.rglob("*.*"))]})
    served = model.predict(frame)[["prob_no", "prob_yes"]].to_numpy()
    images = wrapper._images_from_frame(frame)  # the scans as the server decodes them
    # the served format's own logits, divided by T
    np.testing.assert_allclose(served, scaled_probabilities(wrapper._logits(images), temperature), rtol=1e-5, atol=1e-6)
    # and the Keras student's, within the served format's arithmetic (TFLite float32 or INT8 when promote chose it)
    logits = model_logits(load_student(MODEL, promoted.version.version), images)
    atol = {"keras": 1e-5, "tflite-float32": 1e-4, "tflite-int8": 0.05}[wrapper.serving_format]
    np.testing.assert_allclose(served, scaled_probabilities(logits, temperature), atol=atol)
    raw = scaled_probabilities(wrapper._logits(images))
    assert np.array_equal(served.argmax(axis=1), raw.argmax(axis=1)), "calibration changes no label"
    assert not np.allclose(served, raw), "the temperature changed the probabilities"


@pytest.mark.parametrize("serving_format", ["keras", "tflite-float32", "tflite-int8"])
def test_every_serving_format_divides_its_logits_by_the_temperature(tmp_path, real_data_dir, serving_format):
    from pipelines.models.builders import build_student
    from pipelines.training.quantize import TFLiteModel, int8_export, to_tflite

    student = build_student("tiny", 32, 3, seed=4)
    student.save(tmp_path / "student.keras")
    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (6, 32, 32, 1)).astype(np.float32)
    exports = {"tflite-float32": to_tflite(student), "tflite-int8": int8_export(student, images)}
    artifacts = {"student": str(tmp_path / "student.keras"), "metadata": str(tmp_path / "metadata.json")}
    for name, flatbuffer in exports.items():
        (tmp_path / f"{name}.tflite").write_bytes(flatbuffer)
        artifacts[name] = str(tmp_path / f"{name}.tflite")
    metadata = {"image_size": 32, "class_names": ["a", "b", "c"], "serving_format": serving_format, "temperature": 0.25}
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    wrapper = StudentClassifier()
    wrapper.load_context(SimpleNamespace(artifacts=artifacts))
    logits = model_logits(student, images) if serving_format == "keras" else TFLiteModel(exports[serving_format]).logits(images)
    output = wrapper.predict(None, images)
    np.testing.assert_allclose(output[["prob_a", "prob_b", "prob_c"]].to_numpy(), scaled_probabilities(logits, 0.25), rtol=1e-5, atol=1e-6)
    assert list(output["label"]) == list(np.array(["a", "b", "c"])[logits.argmax(axis=1)])


def card_tables(card: str) -> dict[str, list[list[str]]]:
    """Each Markdown table of the card under the nearest heading above it, rows of cells (header first)."""
    tables, heading, rows = {}, None, []
    for line in card.splitlines() + [""]:
        if line.startswith("#"):
            heading = line.lstrip("# ").strip()
        elif line.startswith("|"):
            if not set(line.replace("|", "").split()) <= {"---"}:
                rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif rows:
            tables.setdefault(heading, rows)
            rows = []
    return tables


def close(cell: str, value: float) -> bool:
    return (cell == "n/a" and not math.isfinite(value)) or abs(float(cell) - value) <= 5e-5


def with_interval(cell: str) -> tuple[str, ...]:
    return re.fullmatch(r"(\S+)(?: \[(\S+), (\S+)\])?", cell).groups()


def test_the_model_card_figures_equal_the_logged_metrics(promoted):
    card = read_card(MODEL, promoted.version.version)
    metrics = promoted.run.data.metrics
    version = MlflowClient().get_model_version(MODEL, promoted.version.version)
    assert version.description == description(card) and version.description.startswith(f"# Model card: {MODEL} v")
    assert "k-fold F1" in version.description
    for section in ("Model details", "Intended use", "Out-of-scope use", "Training data", "Evaluation", "Calibration"):
        assert f"## {section}" in card, section
    assert "## Localisation (Grad-CAM pointing game)\n\nNone yet" in card
    assert "### External validations\n\nNone yet" in card
    tables = card_tables(card)

    calibration = tables["Calibration"]
    assert_calibration_table(calibration, metrics)

    holdout = tables["Hold-out split (5 images, never trained on)"]
    keys = ["accuracy", "f1_macro"] + [f"f1_{key}" for key in class_keys(["no", "yes"])]
    assert [row[0] for row in holdout[1:]] == ["accuracy", "macro-F1", "F1 no", "F1 yes"]
    for row, key in zip(holdout[1:], keys):
        value, low, high = with_interval(row[1])
        assert close(value, metrics[f"holdout_student_{key}"])
        assert close(low, metrics[f"holdout_student_{key}_ci_low"]) and close(high, metrics[f"holdout_student_{key}_ci_high"])
        assert close(row[2], metrics[f"holdout_teacher_{key}"]) and close(row[3], metrics[f"holdout_no_kd_{key}"])

    formats = tables["Model details"]
    for row in formats[1:]:
        assert close(row[2], metrics[Metric.serving_f1(row[0])]) and abs(float(row[3]) - metrics[Metric.serving_p50_ms(row[0])]) <= 5e-4
    assert [row[0] for row in formats[1:] if row[1] == "yes"] == [version.tags[VersionTag.SERVING_FORMAT]]

    counts = tables["Training data"]
    assert counts[-1] == ["total", "19", "5"] and sum(int(row[2]) for row in counts[1:-1]) == int(metrics["holdout_size"])


def test_kd_card_adds_every_external_validation_and_the_pointing_game_once_logged(promoted, tmp_path):
    """What the evaluate and pointing-game steps log (their contract keys), shown by a regenerated card."""
    from kd.cli import run_command

    client = MlflowClient()
    experiment = promoted.run.info.experiment_id
    evaluations = []
    for offset, overlap in ((0.0, 3), (0.1, 0)):
        run = client.create_run(
            experiment, run_name="evaluate", tags={"kd.model_name": MODEL, "kd.model_version": promoted.version.version}
        )
        figures = {"accuracy": 0.7 + offset, "f1_macro": 0.6 + offset, "f1_no": 0.5 + offset, "f1_yes": 0.7 + offset}
        logged = {"overlap_with_training": overlap, "ece": 0.1, "brier": 0.3}
        for name, value in figures.items():
            logged |= {name: value, f"{name}_ci_low": value - 0.2 - offset, f"{name}_ci_high": value + 0.1}
        client.log_batch(run.info.run_id, metrics=[mlflow.entities.Metric(k, v, 0, 0) for k, v in logged.items()])
        client.set_tag(run.info.run_id, RunTag.DATA_DIGEST, "d" * 64)
        client.set_terminated(run.info.run_id)
        evaluations.append((run.info.run_id, logged))
    client.set_model_version_tag(MODEL, promoted.version.version, VersionTag.EVALUATIONS, ",".join(run_id for run_id, _ in evaluations))
    pointing = {
        "pointing_game_student": 0.5,
        "pointing_game_teacher": 0.625,
        "pointing_game_centre": 0.375,
        "pointing_game_brightest": 0.75,
    }
    for key, value in pointing.items():
        client.log_metric(promoted.run.info.run_id, key, value)

    path = run_command("card", ["--model_name", MODEL, "--version", str(promoted.version.version), "--out_dir", str(tmp_path)])
    card = Path(path).read_text()
    assert card == read_card(MODEL, promoted.version.version)
    assert "External validations: 2 (latest macro-F1 0.7000 [0.4000, 0.8000])" in description(card)
    for run_id, logged in evaluations:
        assert f"Run {run_id}" in card and f"{logged['overlap_with_training']} images overlapping the training data" in card
    for label, key in (("accuracy", "accuracy"), ("macro-F1", "f1_macro"), ("F1 no", "f1_no"), ("F1 yes", "f1_yes")):
        for _, logged in evaluations:
            assert f"| {label} | {logged[key]:.4f} [{logged[key + '_ci_low']:.4f}, {logged[key + '_ci_high']:.4f}] |" in card
    localisation = card_tables(card)["Localisation (Grad-CAM pointing game)"]
    assert {row[0]: float(row[1]) for row in localisation[1:]} == {
        "KD student (Grad-CAM)": 0.5,
        "teacher (Grad-CAM)": 0.625,
        "baseline: image centre": 0.375,
        "baseline: brightest smoothed pixel": 0.75,
    }
    limitations = card.split("## Limitations and caveats", 1)[1]
    assert "in the external validations: 3 images" in limitations
    assert "Grad-CAM points at the tumour less often (0.5000) than the brightest pixel does (0.7500)" in limitations
    # the widest interval of all, hold-out first, then each evaluation in order (a tie goes to the first)
    metrics, rows = (
        promoted.run.data.metrics,
        (("accuracy", "accuracy"), ("macro-F1", "f1_macro"), ("F1 no", "f1_no"), ("F1 yes", "f1_yes")),
    )
    widths = {
        ("hold-out", label): metrics[f"holdout_student_{key}_ci_high"] - metrics[f"holdout_student_{key}_ci_low"] for label, key in rows
    }
    for run_id, logged in evaluations:
        widths |= {(f"evaluation {run_id[:8]}", label): logged[f"{key}_ci_high"] - logged[f"{key}_ci_low"] for label, key in rows}
    (where, label), width = max(widths.items(), key=lambda item: item[1])
    assert f"Widest 95 % interval: {label} on the {where}, {width:.4f} wide" in limitations


def test_kd_card_refuses_a_version_given_with_a_stage(promoted, capsys):
    from kd.cli import run_command

    with pytest.raises(SystemExit) as exit_info:
        run_command("card", ["--model_name", MODEL, "--version", "1", "--stage", "Production"])
    assert exit_info.value.code == 2 and "give one of them" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_command("card", ["--model_name", MODEL, "--version", "99"])
    assert f"{MODEL} has no version '99'" in capsys.readouterr().err
    assert CARD_ARTIFACT == "model_card.md"
