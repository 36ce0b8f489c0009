"""The ``main`` chain (prepare -> teacher -> search -> promote) run in-process on a tiny embedded set: the data is
ingested, decoded and hashed once, and that one ``Prepared`` serves every step."""

from __future__ import annotations

from pathlib import Path

import pytest
from kdtest import tiny_config, tracking_at

import pipelines.prepare
from kd.main import run_main

pytestmark = pytest.mark.slow


def test_one_main_chain_ingests_the_data_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    ingested = []
    ingest = pipelines.prepare.ingest
    monkeypatch.setattr(pipelines.prepare, "ingest", lambda cfg: ingested.append(cfg.data_dir) or ingest(cfg))
    # data_dir "": the embedded synthetic set
    cfg = tiny_config("", tmp_path, synthetic_images=40, epochs=1, n_trials=1, study_name="main-once")
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        runs = run_main(cfg)
    assert set(runs) == {"prepare", "teacher", "search", "promote"} and all(runs.values())
    assert ingested == [""], f"main ingested the data {len(ingested)} times"
