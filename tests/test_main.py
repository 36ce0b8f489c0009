"""The ``main`` chain (prepare -> teacher -> search -> promote) run in-process on a tiny embedded set: the data is
ingested, decoded and hashed once, and that one ``Prepared`` serves every step."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from kdtest import tiny_config, tracking_at

import pipelines.steps.prepare
from kd.main import run_main
from registry.roles import CHALLENGER, CHAMPION, current_version

pytestmark = pytest.mark.slow


def test_one_main_chain_ingests_the_data_once_and_logs_each_steps_wall_time(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    ingested = []
    ingest = pipelines.steps.prepare.ingest
    monkeypatch.setattr(pipelines.steps.prepare, "ingest", lambda cfg: ingested.append(cfg.data_dir) or ingest(cfg))
    # data_dir "": the embedded synthetic set
    cfg = tiny_config("", tmp_path, synthetic_images=40, epochs=1, n_trials=1, study_name="main-once")
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        runs = run_main(cfg)
    assert set(runs) == {"main", "prepare", "teacher", "search", "promote"} and all(runs.values())
    assert ingested == [""], f"main ingested the data {len(ingested)} times"
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        walls = mlflow.get_run(runs["main"]).data.metrics
    steps = [walls[f"{step}_wall_s"] for step in ("prepare", "teacher", "search", "promote")]
    assert all(seconds > 0 for seconds in steps) and sum(steps) <= walls["main_wall_s"], walls
    out = capsys.readouterr().out
    assert "main: teacher took 0:" in out
    # n_trials=1: the one trial is the study's first anchor, alpha 1, named for what it is, not "KD, T=5, alpha=1"
    assert "(no KD)" in next(line for line in out.splitlines() if "best trial" in line)


def test_a_main_chain_whose_student_the_gate_refuses_ends_without_production_and_is_not_promoted_twice(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # One KD trial (the baseline trial's alpha is moved into the range 0.5..0.5), and a margin of -1: any no-KD twin
    # counts as better, so the gate refuses the student.
    cfg = tiny_config("", tmp_path, synthetic_images=40, epochs=1, n_trials=1, alpha_range="0.5,0.5", margin=-1.0, study_name="refused")
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        client = mlflow.MlflowClient()
        runs = run_main(cfg)
        assert current_version(client, cfg.model_name, CHAMPION) is None
        challenger = current_version(client, cfg.model_name, CHALLENGER)
        assert challenger is not None and challenger.run_id == runs["promote"]
        assert "Production model: none: the gate refused trial 0" in capsys.readouterr().out
        again = run_main(cfg)
        assert again["promote"] == runs["promote"]
        assert len(client.search_model_versions(f"name = '{cfg.model_name}'")) == 1, "the refused trial was not registered again"
    assert f"promote: challenger {cfg.model_name} v{challenger.version} already is trial 0" in capsys.readouterr().out
