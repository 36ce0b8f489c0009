"""``kd <command>`` under ``mlflow run``: the run MLflow started for the entry point (``MLFLOW_RUN_ID``) is read once,
by ``kd``, and passed down; the step logs into it, and nothing below resumes it by accident. In-process, with the
launched run created as ``mlflow run`` creates it (a made-up name, the entry point's tag, ``MLFLOW_RUN_ID`` set)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from kdtest import tracking_at
from mlflow import MlflowClient

from kd.cli import main as kd
from pipelines.names import RunTag

pytestmark = pytest.mark.slow


def launch(client: MlflowClient, experiment_id: str, entry_point: str, monkeypatch) -> str:
    """A run as ``mlflow run . -e <entry_point>`` leaves it for the command it starts: its id and experiment in the
    environment (the experiment also made the active one, as MLflow does from the environment in a new process)."""
    run = client.create_run(experiment_id, run_name="persistent-croc-697", tags={"mlflow.project.entryPoint": entry_point})
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    mlflow.set_experiment(experiment_id=experiment_id)
    return run.info.run_id


def test_a_launched_prepare_logs_into_its_run_and_a_second_one_stands_for_the_run_it_reused(tmp_path: Path, monkeypatch) -> None:
    data = ["--synthetic_images", "40", "--image_size", "32", "--folds", "2", "--cache_dir", str(tmp_path / "cache")]
    args = ["prepare", *data, "--experiment_name", "not-the-launched-one"]
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}") as uri:
        client = MlflowClient(uri)
        experiment_id = client.create_experiment("launched")
        first = launch(client, experiment_id, "prepare", monkeypatch)
        kd(args)
        assert "MLFLOW_RUN_ID" not in os.environ, "taken out of the environment, so no later start_run resumes it"
        run = client.get_run(first)
        assert (run.info.run_name, run.info.status) == ("prepare", "FINISHED")
        assert (run.data.tags[RunTag.STEP], run.data.tags[RunTag.OUTCOME]) == ("prepare", "trained")

        second = launch(client, experiment_id, "prepare", monkeypatch)
        kd(args)
        again = client.get_run(second)
        assert (again.info.run_name, again.data.tags[RunTag.OUTCOME], again.data.tags[RunTag.REUSED_RUN_ID]) == ("prepare", "reused", first)
        assert {run.info.run_id for run in client.search_runs([experiment_id])} == {first, second}, "no run besides the launched ones"
        assert client.get_experiment_by_name("not-the-launched-one") is None, "a launched run stays in the experiment mlflow run chose"


def test_a_launched_ensemble_teacher_run_holds_its_members_nested_in_it(tmp_path: Path, monkeypatch) -> None:
    data = ["--synthetic_images", "40", "--image_size", "32", "--folds", "2", "--cache_dir", str(tmp_path / "cache")]
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}") as uri:
        client = MlflowClient(uri)
        experiment_id = client.create_experiment("launched")
        launched = launch(client, experiment_id, "teacher", monkeypatch)
        kd(["teacher", *data, "--epochs", "1", "--batch_size", "16", "--teacher_arch", "resnet:S,hybrid:S"])
        run = client.get_run(launched)
        members = run.data.tags[RunTag.TEACHER_RUN_ID].split(",")
        assert (run.info.run_name, run.info.status, len(members)) == ("teacher", "FINISHED", 2)
        for member in map(client.get_run, members):
            assert member.data.tags["mlflow.parentRunId"] == launched and member.data.tags[RunTag.STEP] == "teacher"
            assert member.info.status == "FINISHED"
