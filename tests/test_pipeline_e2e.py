"""End-to-end: `mlflow run` the teacher and distill entry points on a small subset of the real MRI set,
then check the runs, metrics and artifacts in the tracking store (SQLite, and PostgreSQL in CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from kdtest import child_env
from mlflow.tracking import MlflowClient

from pipelines.config import Config, PipelineError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TINY = {"image_size": "32", "folds": "2", "epochs": "2", "patience": "1", "batch_size": "16"}


def mlflow_run(entry: str, tracking_uri: str, **params: str) -> subprocess.CompletedProcess:
    env = child_env(MLFLOW_TRACKING_URI=tracking_uri)
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "run",
        str(ROOT),
        "-e",
        entry,
        "--env-manager",
        "local",
        "--experiment-name",
        "e2e",
    ]
    for name, value in params.items():
        command += ["-P", f"{name}={value}"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def runs_of(client: MlflowClient, step: str, outcome: str | None = None):
    experiment = client.get_experiment_by_name("e2e")
    query = f"tags.`kd.step` = '{step}'" + (f" and tags.`kd.outcome` = '{outcome}'" if outcome else "")
    return client.search_runs([experiment.experiment_id], query)


def check_teacher_then_distill(tracking_uri: str, data_dir: Path) -> None:
    client = MlflowClient(tracking_uri)
    teacher = mlflow_run("teacher", tracking_uri, data_dir=str(data_dir), **TINY)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    [teacher_run] = runs_of(client, "teacher", "trained")
    assert teacher_run.info.status == "FINISHED"
    metrics = teacher_run.data.metrics
    assert 0.0 <= metrics["f1_mean"] <= 1.0 and metrics["f1_std"] >= 0.0 and metrics["teacher_params"] > 100_000
    assert {"fold_0_loss", "fold_1_val_loss", "fold_0_val_auc"} <= set(metrics)
    artifacts = {a.path for top in ("models", "logits", "evaluation", "data") for a in client.list_artifacts(teacher_run.info.run_id, top)}
    assert {"models/fold_0.keras", "models/fold_1.keras", "models/all.keras", "logits/teacher_logits.npz", "data/splits.csv"} <= artifacts
    assert {
        "evaluation/confusion_matrix.png",
        "evaluation/roc_curve.png",
        "evaluation/pr_curve.png",
        "evaluation/classification_report.txt",
    } <= artifacts
    [dataset_input] = teacher_run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == teacher_run.data.tags["kd.data_digest"][:32]

    distill = mlflow_run("distill", tracking_uri, data_dir=str(data_dir), temperature="3", alpha="0.5", student_size="tiny", **TINY)
    assert distill.returncode == 0, distill.stderr[-3000:]
    [distill_run] = runs_of(client, "distill", "trained")
    metrics = distill_run.data.metrics
    assert {"f1_mean", "f1_std", "student_params", "f1_fold_0", "f1_fold_1"} <= set(metrics)
    assert metrics["f1_mean"] == pytest.approx((metrics["f1_fold_0"] + metrics["f1_fold_1"]) / 2)
    assert metrics["student_params"] * 20 <= teacher_run.data.metrics["teacher_params"]
    assert distill_run.data.tags["kd.teacher_run_id"] == teacher_run.info.run_id, "the finished teacher is reused"
    assert len(runs_of(client, "teacher", "trained")) == 1, "no teacher was trained twice"
    assert {"models/student_fold_0.keras", "models/student_fold_1.keras"} <= {
        a.path for a in client.list_artifacts(distill_run.info.run_id, "models")
    }


def test_teacher_and_distill_entry_points_on_real_scans(mri_subset, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    check_teacher_then_distill(tracking_uri, mri_subset)
    client = MlflowClient(tracking_uri)

    again = mlflow_run("teacher", tracking_uri, data_dir=str(mri_subset), **TINY)
    assert again.returncode == 0 and "reusing finished run" in again.stdout
    [reused] = runs_of(client, "teacher", "reused")
    [trained] = runs_of(client, "teacher", "trained")
    assert reused.data.tags["kd.reused_run_id"] == trained.info.run_id

    online = mlflow_run("distill", tracking_uri, data_dir=str(mri_subset), teacher_mode="online", fold="1", **TINY)
    assert online.returncode == 0, online.stderr[-3000:]
    assert any(
        run.data.params.get("teacher_mode") == "online" and "f1_fold_1" in run.data.metrics for run in runs_of(client, "distill", "trained")
    )

    baseline = mlflow_run("distill", tracking_uri, data_dir=str(mri_subset), no_kd="true", **TINY)
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    no_kd = [run for run in runs_of(client, "distill", "trained") if run.data.params.get("no_kd") == "true"]
    assert len(no_kd) == 1 and "kd.teacher_run_id" not in no_kd[0].data.tags


def test_bad_data_dir_fails_with_one_line_and_a_failed_run(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = mlflow_run("teacher", tracking_uri, data_dir=str(tmp_path / "missing"), **TINY)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "missing" in errors[0] and "does not exist" in errors[0]
    runs = MlflowClient(tracking_uri).search_runs([MlflowClient(tracking_uri).get_experiment_by_name("e2e").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]


def test_diverging_training_stops_with_a_clear_error_and_a_failed_run(mri_subset, tmp_path):
    from pipelines.steps.teacher import train_teacher

    tracking_uri, previous_uri = f"sqlite:///{tmp_path / 'mlflow.db'}", mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        cfg = Config(data_dir=str(mri_subset), image_size=32, folds=2, epochs=3, experiment_name="nan", cache_dir=str(tmp_path / "cache"))
        cfg.learning_rate = 1e30  # past Config's range on purpose: the guard must hold whatever reaches training
        with pytest.raises(PipelineError, match="diverged.*learning_rate"):
            train_teacher(cfg)
        [run] = MlflowClient(tracking_uri).search_runs([MlflowClient(tracking_uri).get_experiment_by_name("nan").experiment_id])
        assert run.info.status == "FAILED" and run.data.tags["kd.outcome"] == "running"
    finally:
        mlflow.set_tracking_uri(previous_uri)


@pytest.mark.postgres
def test_teacher_and_distill_against_postgresql(mri_subset, postgres_uri):
    check_teacher_then_distill(postgres_uri, mri_subset)


def test_search_and_promote_entry_points(mri_subset, tmp_path):
    tracking_uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    search = mlflow_run("search", tracking_uri, data_dir=str(mri_subset), n_trials="2", study_name="entry", storage=storage, **TINY)
    assert search.returncode == 0, search.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    [parent] = runs_of(client, "search")
    trials = runs_of(client, "trial")
    assert len(trials) == 2
    for trial in trials:  # each trial is its own run, nested in the `mlflow run` run, with its own parameters
        assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial.data.params["student_size"] == f"{trial.data.params['width']}x{trial.data.params['depth']}"
    assert parent.info.status == "FINISHED" and "best_f1_mean" in parent.data.metrics

    promote = mlflow_run("promote", tracking_uri, study_name="entry", storage=storage, model_name="entry-model")
    assert promote.returncode == 0, promote.stderr[-3000:]
    assert "-> Production (alias champion): no champion yet" in promote.stdout
    version = client.get_model_version_by_alias("entry-model", "champion")
    assert version.current_stage == "Production" and version.tags["study"] == "entry"


def test_two_distill_runs_started_together_train_the_teacher_once(mri_subset, tmp_path, reliability):
    """The second waits on the teacher lock (the search's, through the study storage) and reuses the first's teachers."""
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    client.create_experiment("e2e")  # the schema and experiment exist before the two start, as on a team server
    args = [
        f"--{name}={value}"
        for name, value in {
            **TINY,
            "data_dir": str(mri_subset),
            "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
            "experiment_name": "e2e",
            "cache_dir": str(tmp_path / "cache"),
            "student_size": "tiny",
            "fold": "0",
        }.items()
    ]
    env = child_env(MLFLOW_TRACKING_URI=tracking_uri)
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "kd", "distill", *args, f"--temperature={t}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for t in (2, 4)
    ]
    outputs = [worker.communicate(timeout=900)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(output[-2000:] for output in outputs)

    teachers = runs_of(client, "teacher")
    distills = runs_of(client, "distill", "trained")
    assert len(teachers) == 1 and teachers[0].info.status == "FINISHED", [(r.info.run_id, r.data.tags.get("kd.outcome")) for r in teachers]
    assert len(distills) == 2 and {run.data.tags["kd.teacher_run_id"] for run in distills} == {teachers[0].info.run_id}
    reliability.fault(
        "two `kd distill` runs started together on the same data (SQLite storage lock)",
        "one teacher run trained, both distill runs FINISHED and use it",
    )
    reliability.lost(
        "runs",
        sum(run.info.status == "RUNNING" for run in client.search_runs([teachers[0].info.experiment_id])),
        "after two distill runs started together",
    )


def _log_data_at(tracking_uri: str, cache_dir: str, start: float) -> str:
    """A process that logs the embedded set's manifest and splits to a new run at ``start`` (wall clock)."""
    import time

    from pipelines.steps.prepare import prepare_data
    from pipelines.tracking.runs import log_data

    prepared = prepare_data(Config(synthetic_images=40, image_size=32, folds=2, cache_dir=cache_dir))
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("e2e")
    with mlflow.start_run() as run:
        while time.time() < start:  # a busy wait (a sleep wakes too unevenly): the inserts must meet within a millisecond
            pass
        log_data(prepared.dataset, prepared.splits)
    return run.info.run_id


def test_runs_logging_the_same_data_at_the_same_moment_all_record_it(tmp_path):
    """MLflow's SQL store looks a dataset up and then inserts it: of several runs logging one dataset at once, all but
    one broke its unique key (9 of 12 in three rounds of four, measured) until log_data logged again."""
    import multiprocessing
    import time

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri).create_experiment("e2e")
    start = time.time() + 15  # after every process has imported and prepared (a few seconds)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        run_ids = pool.starmap(_log_data_at, [(tracking_uri, str(tmp_path / "cache"), start)] * 4)
    client = MlflowClient(tracking_uri)
    digests = [{entry.dataset.digest for entry in client.get_run(run_id).inputs.dataset_inputs} for run_id in run_ids]
    assert len(set(run_ids)) == 4 and all(len(found) == 1 for found in digests) and len({*map(frozenset, digests)}) == 1
