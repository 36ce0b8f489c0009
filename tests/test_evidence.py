"""``kd evidence`` end to end on a small real subset of the 4-class set (40 scans per class, 32 px, tiny training):
``results.json`` holds every contract key, and each of its numbers is the one the runs logged (p-values recomputed from
the logged fold scores); its documents name no path of this machine; a second run trains nothing and finds the same.
Also the light parts: how documents name data, and how a command line is shown."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import REAL_DATA_DIR
from kdtest import child_env

from pipelines.config import PROJECT_ROOT
from pipelines.evaluation.statistics import corrected_resampled_t_test, holm
from pipelines.names import Metric, RunTag
from registry.report.document import data_label

FOUR_CLASS_DIR = REAL_DATA_DIR.parent / "brain-mri-4class"
CONTRACT = {"teacher_params", "teacher_f1_macro_mean", "teacher_f1_macro_std", "cells", "holdout_f1_macro", "main_wall_s"}
RUN_KEYS = {"command", "code_commit", "data_digest", "wall_s"}
CELL_CONTRACT = {
    "student",
    "student_params",
    "imbalance",
    "kd_f1_macro_mean",
    "nokd_f1_macro_mean",
    "delta",
    "p_corrected",
    "p_holm",
    "kd_f1_minority_mean",
    "nokd_f1_minority_mean",
    "n_pairs",
}
# The recipe's training, made tiny: 2 folds x 2 repeats (the real run: 3 x 3), 2 epochs, a small teacher at 48 px.
TINY = (
    ["--image_size", "32", "--teacher_arch", "resnet:S", "--teacher_image_size", "48", "--epochs", "2", "--patience", "1"]
    + ["--folds", "2", "--repeats", "2", "--students", "2x1,4x1", "--n_trials", "2", "--width_range", "8,8", "--depth_range", "2,2"]
    + ["--batch_size", "32", "--fold_workers", "1"]  # a fold worker's start costs more than these folds take
)


def test_documents_name_data_relative_to_the_project_or_by_name_only():
    assert data_label(PROJECT_ROOT.parent / "shared" / "data" / "brain-mri-4class") == "../shared/data/brain-mri-4class"
    assert data_label(PROJECT_ROOT / "data" / "scans") == "data/scans"
    assert data_label("/somewhere/else/scans") == "scans"
    assert data_label("") == "the embedded synthetic set"


def test_the_evidence_command_line_is_shown_without_this_machines_paths():
    from kd.evidence import command_text

    shown = command_text("evidence", ["--data_dir", "/tmp/x/four-class", "--storage=sqlite:////tmp/x/optuna.db", "--folds", "3"])
    assert shown == "kd evidence --data_dir four-class --storage=sqlite:///optuna.db --folds 3"


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not all((FOUR_CLASS_DIR / name).is_dir() for name in ("glioma", "meningioma", "notumor", "pituitary")):
        pytest.skip(f"the 4-class set is not at {FOUR_CLASS_DIR}")
    from benchmarks.training import subsample

    return subsample(FOUR_CLASS_DIR, tmp_path_factory.mktemp("evidence-data"), 40)


def evidence(root: Path, subset: Path) -> tuple[str, dict]:
    command = [sys.executable, "-m", "kd", "evidence", "--data_dir", str(subset), *TINY, "--cache_dir", str(root / "cache")]
    command += ["--storage", f"sqlite:///{root / 'optuna.db'}", "--out_dir", str(root / "docs")]
    env = child_env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return done.stdout, json.loads((root / "docs" / "results.json").read_text())


@pytest.mark.slow
def test_kd_evidence_writes_every_contract_number_as_the_runs_logged_it_and_reuses_everything_when_run_again(tmp_path, subset):
    output, results = evidence(tmp_path, subset)
    assert CONTRACT | RUN_KEYS <= set(results), CONTRACT | RUN_KEYS - set(results)
    assert len(results["cells"]) == 4 and all(CELL_CONTRACT <= set(cell) for cell in results["cells"])
    assert {(cell["student"], cell["imbalance"]) for cell in results["cells"]} == {("2x1", 0), ("2x1", 10), ("4x1", 0), ("4x1", 10)}
    assert results["command"].startswith("kd evidence --data_dir four-class ") and results["code_commit"]

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.`{RunTag.STEP}` = 'evidence'", max_results=10)
    assert run.data.metrics[Metric.WALL_S] == results["wall_s"] and run.data.tags[RunTag.DATA_DIGEST] == results["data_digest"]
    main = client.get_run(results["main_run_id"])
    assert main.data.metrics["main_wall_s"] == results["main_wall_s"] > 0
    assert sum(main.data.metrics[f"{step}_wall_s"] for step in ("prepare", "teacher", "search", "promote")) <= results["main_wall_s"]
    assert results["main_steps"] == dict.fromkeys(("prepare", "teacher", "search", "promote"), "ran"), "main ran first: it trained all"
    assert main.data.tags[RunTag.DATA_DIGEST] == results["data_digest"]
    promote = client.get_run(main.data.tags["kd.promote_run_id"])
    assert results["holdout_f1_macro"] == promote.data.metrics["holdout_student_f1_macro"]
    teacher = client.get_run(results["teacher_run_id"])
    assert results["teacher_params"] == teacher.data.metrics[Metric.TEACHER_PARAMS]
    assert results["teacher_f1_macro_mean"] == teacher.data.metrics["f1_macro_mean"]
    assert results["teacher_f1_macro_std"] == teacher.data.metrics["f1_macro_std"]
    assert teacher.data.params["teacher_image_size"] == "48" and teacher.data.params["augment"] == "True", "the strong recipe"

    pairs = results["folds"] * results["repeats"]
    p_values = []
    for cell in results["cells"]:
        kd, twin = client.get_run(cell["kd_run_id"]).data.metrics, client.get_run(cell["nokd_run_id"]).data.metrics
        assert cell["teacher_over_student"] >= 20 and cell["student_params"] == kd[Metric.STUDENT_PARAMS]
        assert (cell["kd_f1_macro_mean"], cell["nokd_f1_macro_mean"]) == (kd["f1_macro_mean"], twin["f1_macro_mean"])
        assert (cell["kd_f1_minority_mean"], cell["nokd_f1_minority_mean"]) == (kd["f1_minority_mean"], twin["f1_minority_mean"])
        assert cell["n_pairs"] == pairs == 4
        test = corrected_resampled_t_test(
            [kd[Metric.fold_f1(k)] for k in range(pairs)], [twin[Metric.fold_f1(k)] for k in range(pairs)], kd[Metric.TEST_TRAIN_RATIO]
        )
        assert math.isclose(cell["delta"], test.mean_difference, abs_tol=1e-12)
        assert math.isclose(cell["delta"], cell["kd_f1_macro_mean"] - cell["nokd_f1_macro_mean"], abs_tol=1e-9), "macro-F1 is F1"
        assert cell["p_corrected"] == pytest.approx(test.pvalue, nan_ok=True)
        p_values.append(test.pvalue)
    for cell, adjusted in zip(results["cells"], holm(p_values)):
        assert cell["p_holm"] == pytest.approx(adjusted, nan_ok=True)

    docs = tmp_path / "docs"
    pictures = sorted(path.name for path in docs.glob("*.png"))
    assert len(pictures) == 4 and "holdout-confusion-matrix.png" in pictures
    for name in ("results.json", "evidence.md", "evidence.tex"):
        text = (docs / name).read_text()
        assert str(tmp_path) not in text and "/tmp/" not in text, f"{name} names a path of this machine"
    markdown = (docs / "evidence.md").read_text()
    assert f"{results['holdout_f1_macro']:.4f}" in markdown and f"{results['teacher_f1_macro_mean']:.4f}" in markdown
    assert "main: teacher took" in output

    again, second = evidence(tmp_path, subset)
    assert f"evidence: reusing main run {results['main_run_id']}" in again and "8/8 cells finished before" in again
    changes = {key for key in results if results[key] != second[key]}
    assert changes == {"wall_s", "evidence_run_id"}, f"a second run re-read the same numbers (changed: {changes})"
    assert second["wall_s"] < results["wall_s"], "nothing trained the second time"


def test_mlflow_runs_evidence_with_parameters_the_recipe_does_not_set():
    from mlflow.projects._project_spec import load_project

    from pipelines.recipes import EVIDENCE_DEFAULTS, RECIPES

    entry = load_project(str(PROJECT_ROOT)).get_entry_point("evidence")
    taken = set(entry.parameters)
    assert not taken & set().union(*RECIPES.values()), "an MLproject parameter always given would override the recipe's value"
    for name, value in EVIDENCE_DEFAULTS.items():
        if name in taken:
            assert str(entry.parameters[name].default) == str(value), name
    assert "--recipe {recipe}" in entry.command and entry.parameters["out_dir"].default == ""
