"""The registry, for real: a tiny search, promotion through the gate, fetch by stage and alias, rollback,
and a real `mlflow models serve` process answering real image requests."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from kdtest import MODEL, assert_roles_agree, check_serving, tiny_config, tracking_at
from mlflow import MlflowClient

import registry
from pipelines.config import PipelineError
from pipelines.names import Metric
from registry.fetch import resolve_version
from registry.model import encode_file
from registry.promote import choose_serving_format, promote
from registry.roles import history, rollback
from search.tune import run_search

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracked(mri_subset, tmp_path_factory):
    """A tracking store holding a finished tiny search."""
    root = tmp_path_factory.mktemp("registry")
    with tracking_at(f"sqlite:///{root / 'mlflow.db'}"):
        run_search(tiny_config(mri_subset, root))
        yield root


@pytest.fixture
def champion(tracked, mri_subset) -> None:
    """Some version is champion (the gate test may already have made one)."""
    if not MlflowClient().search_model_versions(f"name = '{MODEL}'"):
        promote(tiny_config(mri_subset, tracked, force=True))


def test_gate_promotes_refuses_forces_and_rolls_back(tracked, mri_subset):
    # margin 1: the student's no-KD twin cannot beat it by more, whichever of the two trials won on this data
    first = promote(tiny_config(mri_subset, tracked, margin=1.0))
    assert first.promoted and first.reason == "no champion yet"
    assert_roles_agree(MODEL)
    version = MlflowClient().get_model_version(MODEL, first.version)
    for tag in (
        "study",
        "trial",
        "kfold_f1_mean",
        "kfold_f1_std",
        "holdout_f1",
        "params_count",
        "teacher_run_id",
        "data_digest",
        "code_version",
    ):
        assert version.tags.get(tag), tag
    assert float(version.tags["holdout_f1"]) == pytest.approx(first.holdout_f1, abs=1e-6)
    assert "k-fold F1" in version.description
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{first.version}"))
    assert not [f for f in model_dir.rglob("*") if f.suffix in (".pkl", ".pickle")], (
        "the served model is code and a safe-mode .keras file, no pickle"
    )
    # Every serving format was timed and scored; the version serves the one promote chose, and says which.
    serving_format = version.tags["serving_format"]
    run = MlflowClient().get_run(version.run_id)
    assert run.data.tags["kd.serving_format"] == serving_format
    assert json.loads(next(model_dir.rglob("metadata.json")).read_text())["serving_format"] == serving_format
    assert {f.name for f in model_dir.rglob("*.tflite")} == {"student_float32.tflite", "student_int8.tflite"}
    for name in ("keras", "tflite-float32", "tflite-int8"):
        assert run.data.metrics[Metric.serving_p50_ms(name)] > 0 and 0 <= run.data.metrics[Metric.serving_f1(name)] <= 1
    assert serving_format == choose_serving_format(
        {
            name: {"f1": run.data.metrics[Metric.serving_f1(name)], "p50_ms": run.data.metrics[Metric.serving_p50_ms(name)]}
            for name in ("keras", "tflite-float32", "tflite-int8")
        }
    )
    teachers = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], "tags.`kd.step` = 'teacher' and tags.`kd.outcome` = 'trained'"
    )
    assert len(teachers) == 1 and version.tags["teacher_run_id"] == teachers[0].info.run_id, "promotion reuses the search's teachers"

    # an impossible margin: the new version cannot beat the champion, the registry keeps its champion
    refused = promote(tiny_config(mri_subset, tracked, margin=1.0))
    assert not refused.promoted and "does not beat" in refused.reason
    assert refused.champion_f1 == pytest.approx(first.holdout_f1), "the champion is re-evaluated on the same hold-out data"
    assert resolve_version(MODEL, alias="champion").version == first.version
    assert resolve_version(MODEL, stage="Staging").version == refused.version
    assert_roles_agree(MODEL)

    forced = promote(tiny_config(mri_subset, tracked, margin=1.0, force=True))
    assert forced.promoted and forced.reason.startswith("forced")
    assert resolve_version(MODEL, stage="Production").version == forced.version
    assert MlflowClient().get_model_version(MODEL, first.version).current_stage == "Archived"
    assert_roles_agree(MODEL)

    assert rollback(MODEL, "test") == first.version
    assert resolve_version(MODEL, alias="champion").version == first.version
    assert_roles_agree(MODEL)
    events = [(e["event"], e["version"], e["previous"]) for e in history(MODEL)]
    assert events == [
        ("promote", first.version, None),
        ("challenger", refused.version, first.version),
        ("promote", forced.version, first.version),
        ("rollback", first.version, forced.version),
    ]
    assert all(e["who"] and e["when"] and e["why"] for e in history(MODEL))


def test_a_kd_student_worse_than_its_no_kd_twin_becomes_challenger_unless_forced(tracked, mri_subset):
    """Every trial distils (alpha fixed at 0.5, so the baseline trial starts at 0.5 too). Margin -1: the twin counts
    as better unless the student beats it by a whole F1 point, which a 2-epoch student on this data does not."""
    cfg = tiny_config(mri_subset, tracked, study_name="twin-study", alpha_range="0.5,0.5", model_name="twin-model", margin=-1.0)
    study = run_search(cfg)
    assert {t.params["alpha"] for t in study.trials} == {0.5}
    client = MlflowClient()

    refused = promote(cfg)
    assert not refused.promoted and "no-KD twin" in refused.reason and "distillation did not help" in refused.reason
    assert resolve_version("twin-model", alias="challenger").version == refused.version
    with pytest.raises(PipelineError, match="no version with alias"):
        resolve_version("twin-model", alias="champion")
    run = client.get_run(client.get_model_version("twin-model", refused.version).run_id)
    assert run.data.tags["kd.no_kd_twin"] == "better" and run.data.tags["kd.gate"] == refused.reason
    assert (
        f"{run.data.metrics['holdout_no_kd_f1']:.4f}" in refused.reason
        and f"{run.data.metrics['holdout_student_f1']:.4f}" in refused.reason
    )

    forced = promote(cfg.replace(force=True))
    assert forced.promoted and forced.reason.startswith("forced: no champion yet, although its no-KD twin's")
    assert resolve_version("twin-model", alias="champion").version == forced.version
    assert_roles_agree("twin-model")


def test_fetch_by_stage_and_alias_predicts_on_image_files(champion, real_data_dir):
    by_stage, by_alias = resolve_version(MODEL, stage="Production"), resolve_version(MODEL, alias="champion")
    assert by_stage.version == by_alias.version
    model = registry.fetch_model(MODEL, stage="Production")
    files = sorted((real_data_dir / "yes").iterdir())[-3:] + sorted((real_data_dir / "no").iterdir())[-2:]
    output = model.predict(pd.DataFrame({"image": [encode_file(f) for f in files]}))
    assert list(output.columns) == ["label", "prob_no", "prob_yes"] and len(output) == 5
    np.testing.assert_allclose(output[["prob_no", "prob_yes"]].sum(axis=1), 1.0, rtol=1e-6)
    assert set(output["label"]) <= {"no", "yes"}
    same = mlflow.pyfunc.load_model(f"models:/{MODEL}/Production").predict(pd.DataFrame({"image": [encode_file(f) for f in files]}))
    pd.testing.assert_frame_equal(output, same)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stage": "Production", "name": "no-such-model"}, "no registered model"),
        ({"stage": "Live"}, "stage='Live'"),
        ({"alias": "nobody"}, "no version with alias"),
    ],
)
def test_bad_fetch_requests_fail_clearly(champion, kwargs, match):
    name = kwargs.pop("name", MODEL)
    with pytest.raises(PipelineError, match=match):
        resolve_version(name, **kwargs)


def test_promote_without_a_complete_trial_fails_and_registers_nothing(tracked, mri_subset):
    import optuna

    cfg = tiny_config(mri_subset, tracked, study_name="empty-study", model_name="never-registered")
    optuna.create_study(study_name="empty-study", storage=cfg.storage_url, direction="maximize")
    with pytest.raises(PipelineError, match="no complete trial"):
        promote(cfg)
    with pytest.raises(PipelineError, match="no study 'missing'"):
        promote(tiny_config(mri_subset, tracked, study_name="missing"))
    assert not MlflowClient().search_registered_models("name = 'never-registered'")


def test_mlflow_models_serve_answers_real_images(champion, real_data_dir):
    files = sorted((real_data_dir / "yes").iterdir())[-2:] + sorted((real_data_dir / "no").iterdir())[-2:]
    check_serving(MODEL, mlflow.get_tracking_uri(), files)
