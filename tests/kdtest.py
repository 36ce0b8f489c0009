"""Helpers shared by the registry and server tests (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient

import registry
from pipelines.config import Config
from registry.model import encode_file
from registry.server import serve_model

MODEL = "test-student"


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI under test: this venv first on PATH, and no MLflow run or experiment
    leaked from in-process tests (``mlflow.set_experiment`` exports MLFLOW_EXPERIMENT_ID)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return {**env, "CI": "1", **extra}


def tiny_config(data_dir: Path, root: Path, **changes) -> Config:
    base = dict(
        data_dir=str(data_dir),
        image_size=32,
        folds=2,
        epochs=2,
        patience=1,
        batch_size=16,
        n_trials=2,
        study_name="registry-test",
        storage=f"sqlite:///{root / 'optuna.db'}",
        model_name=MODEL,
        experiment_name="registry-test",
        cache_dir=str(root / "cache"),
    )
    return Config(**{**base, **changes})


@contextmanager
def tracking_at(uri: str) -> Iterator[str]:
    """MLflow tracks to ``uri`` inside the block, and where it tracked before afterwards.

    Runs started without an experiment go to the store's Default experiment: the process's active experiment is an
    id in whatever store an earlier test used, which another store may not have."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id="0")
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)


def cli_args(cfg: Config) -> list[str]:
    """The command-line flags that give ``cfg`` (its fields that differ from the defaults)."""
    defaults = Config()
    return [
        arg
        for f in fields(Config)
        if getattr(cfg, f.name) != getattr(defaults, f.name)
        for arg in (f"--{f.name}", str(getattr(cfg, f.name)))
    ]


def assert_roles_agree(name: str) -> None:
    """Stage and alias always agree: champion <-> Production, challenger <-> Staging, one of each at most."""
    client = MlflowClient()
    # search_model_versions leaves aliases out: read each version whole
    versions = [client.get_model_version(name, v.version) for v in client.search_model_versions(f"name = '{name}'")]
    for version in versions:
        aliases = set(version.aliases)
        assert ("champion" in aliases) == (version.current_stage == "Production"), (version.version, version.current_stage, aliases)
        assert ("challenger" in aliases) == (version.current_stage == "Staging"), (version.version, version.current_stage, aliases)
    assert sum(v.current_stage == "Production" for v in versions) <= 1


def _post(port: int, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def check_serving(model_name: str, tracking_uri: str, files: list[Path]) -> None:
    """A served Production model answers real images like the in-process model, and bad requests with 4xx."""
    server, port = serve_model(f"models:/{model_name}/Production", tracking_uri)
    try:
        images = [encode_file(f) for f in files]
        status, body = _post(port, json.dumps({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}).encode())
        assert status == 200, body
        served = pd.DataFrame(body["predictions"])
        local = registry.fetch_model(model_name, stage="Production").predict(pd.DataFrame({"image": images}))
        np.testing.assert_allclose(served[["prob_no", "prob_yes"]].sum(axis=1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(
            served[["prob_no", "prob_yes"]].to_numpy(), local[["prob_no", "prob_yes"]].to_numpy(), rtol=1e-5, atol=1e-6
        )
        assert list(served["label"]) == list(local["label"])

        truncated = base64.b64encode(files[0].read_bytes()[:200]).decode()
        bad_requests = {
            "not an image": [[base64.b64encode(b"hello, this is text").decode()]],
            "truncated file": [[truncated]],
            "not base64": [["%%%not base64%%%"]],
            "empty batch": [],
        }
        for what, data in bad_requests.items():
            status, body = _post(port, json.dumps({"dataframe_split": {"columns": ["image"], "data": data}}).encode())
            assert 400 <= status < 500, (what, status, body)
        assert 400 <= _post(port, b"{not json")[0] < 500
    finally:
        server.terminate()
        server.wait(timeout=30)


def assert_calibration_table(rows: list[list[str]], metrics: dict[str, float]) -> None:
    """A calibration table as the report and the model card print it (header first; per model: name, temperature, then
    ECE, MCE, Brier and NLL as trained and calibrated) holds the promote run's logged figures, to the printed 4 decimals."""
    from pipelines.names import Metric
    from registry.calibrate import MODELS

    assert [row[0] for row in rows[1:]] == list(MODELS.values())
    for row, who in zip(rows[1:], MODELS):
        keys = [Metric.temperature(who)] + [
            Metric.calibration(who, name, calibrated) for calibrated in (False, True) for name in Metric.CALIBRATION
        ]
        for cell, key in zip(row[1:], keys, strict=True):
            assert abs(float(cell) - metrics[key]) <= 5e-5, (who, key, cell)
