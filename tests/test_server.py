"""The team setup, for real: `mlflow server` with basic-auth logins on PostgreSQL, S3 artifacts (moto's S3
server on loopback), and search -> promote -> fetch -> serve through it over HTTP from the CLIs.

Access control: anonymous requests are refused, a read-only user fetches the Production model but cannot
register, promote or roll back. Credentials (S3 keys, the study database's password, logins) appear in no
logged param, tag, artifact, registry entry or log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import boto3
import mlflow
import pandas as pd
import pytest
from kdtest import MODEL, assert_roles_agree, check_serving, child_env, cli_args, tiny_config
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from moto.server import ThreadedMotoServer

import registry
from pipelines.config import STORAGE_URL_ENV
from registry.model import encode_file
from registry.roles import history
from registry.server import auth_environment, free_port, server_command

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
SECRETS = {
    "s3": "kd-s3-secret-9f2c1e",
    "database": "kd-db-secret-41ab07",
    "admin": "kd-admin-secret-77e1d3",
    "reader": "kd-reader-secret-3d0a5b",
    "csrf key": "kd-csrf-secret-c81f42",
}
S3_KEYS = {"AWS_ACCESS_KEY_ID": "kd-test-key", "AWS_SECRET_ACCESS_KEY": SECRETS["s3"], "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Team:
    url: str
    s3_endpoint: str
    cfg: object
    logs: dict[str, str]  # CLI output by step
    server_log: Path


def wait_until_up(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except urllib.error.HTTPError:  # answering, if only to say "log in"
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise AssertionError(log.read_text()[-3000:]) from None
            time.sleep(1)


def run_cli(name: str, command: list[str], url: str, logs: dict[str, str]) -> None:
    result = subprocess.run(command, env=child_env(MLFLOW_TRACKING_URI=url), capture_output=True, text=True, timeout=900)
    logs[name] = result.stdout + result.stderr
    assert result.returncode == 0, logs[name][-4000:]


@pytest.fixture(scope="module")
def team(module_postgres_databases, mri_subset, tmp_path_factory):
    """The server with logins, and a search and two promotions (the second forced) made through it by the admin."""
    root = tmp_path_factory.mktemp("team")
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    moto.start()
    s3_endpoint = f"http://127.0.0.1:{moto._port}"
    with pytest.MonkeyPatch.context() as env:
        for key, value in {
            **S3_KEYS,
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": SECRETS["admin"],
        }.items():
            env.setenv(key, value)
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="kd-artifacts")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server_env = {
            **os.environ,
            **auth_environment(f"sqlite:///{root / 'auth.db'}", root / "basic_auth.ini"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": SECRETS["admin"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": SECRETS["csrf key"],
        }
        server_log = root / "server.log"
        server = subprocess.Popen(
            server_command(module_postgres_databases(), "s3://kd-artifacts/mlflow", "127.0.0.1", port, auth=True),
            env=server_env,
            stdout=open(server_log, "w"),
            stderr=subprocess.STDOUT,
        )
        previous = mlflow.get_tracking_uri()
        try:
            wait_until_up(url, server, server_log)
            mlflow.set_tracking_uri(url)
            # A database password in the study's URL (PostgreSQL here trusts loopback and ignores it), given the
            # way a parameter never could: in the environment (a storage parameter with a password is refused).
            env.setenv(STORAGE_URL_ENV, module_postgres_databases().replace("postgres@", f"postgres:{SECRETS['database']}@"))
            cfg = tiny_config(mri_subset, root, storage="", n_trials=1)
            logs: dict[str, str] = {}
            run_cli("search", [sys.executable, "-m", "kd", "search", *cli_args(cfg)], url, logs)
            run_cli("promote", [sys.executable, "-m", "kd", "promote", *cli_args(cfg)], url, logs)
            run_cli("promote --force", [sys.executable, "-m", "kd", "promote", *cli_args(cfg), "--force", "true"], url, logs)
            yield Team(url, s3_endpoint, cfg, logs, server_log)
        finally:
            mlflow.set_tracking_uri(previous)
            server.terminate()
            server.wait(timeout=30)
            moto.stop()


def test_search_promote_fetch_serve_through_postgresql_and_s3(team, real_data_dir):
    assert_roles_agree(MODEL)
    assert [e["event"] for e in history(MODEL)] == ["promote", "promote"]
    keys = [
        item["Key"]
        for page in boto3.client("s3", endpoint_url=team.s3_endpoint).get_paginator("list_objects_v2").paginate(Bucket="kd-artifacts")
        for item in page.get("Contents", [])
    ]
    assert any(key.endswith("logits/teacher_logits.npz") for key in keys), "teacher artifacts are in the bucket"
    assert any(key.endswith("artifacts/student.keras") for key in keys), "the registered model is in the bucket"
    assert any(key.endswith("MLmodel") for key in keys)

    files = sorted((real_data_dir / "yes").iterdir())[:2] + sorted((real_data_dir / "no").iterdir())[:2]
    check_serving(MODEL, team.url, files)


def _request(url: str, method: str = "GET", body: dict | None = None) -> int:
    request = urllib.request.Request(
        url, method=method, data=json.dumps(body).encode() if body else None, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_anonymous_clients_can_neither_read_nor_write(team, monkeypatch, reliability):
    api = f"{team.url}/api/2.0/mlflow"
    assert _request(f"{api}/experiments/search?max_results=1") == 401
    assert _request(f"{api}/experiments/create", "POST", {"name": "anonymous"}) == 401
    assert _request(f"{api}/registered-models/alias", "POST", {"name": MODEL, "alias": "champion", "version": "1"}) == 401
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(MlflowException):
        MlflowClient(team.url).create_experiment("anonymous")
    reliability.fault("anonymous reads and writes (REST and MLflow client) against the basic-auth server", "HTTP 401, nothing written")


def test_a_read_only_user_fetches_production_but_cannot_register_promote_or_roll_back(team, monkeypatch, real_data_dir, reliability):
    from mlflow.server import get_app_client

    get_app_client("basic-auth", tracking_uri=team.url).create_user("reader", SECRETS["reader"])  # as the admin
    admin = MlflowClient(team.url)
    before = ([e["when"] for e in history(MODEL)], admin.get_model_version_by_alias(MODEL, "champion").version)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRETS["reader"])
    scan = sorted((real_data_dir / "yes").iterdir())[0]
    prediction = registry.fetch_model(MODEL, stage="Production").predict(pd.DataFrame({"image": [encode_file(scan)]}))
    assert prediction["prob_yes"].between(0, 1).all()

    reader = MlflowClient(team.url)
    champion = reader.get_model_version_by_alias(MODEL, "champion")
    refusals = {
        "register a version": lambda: reader.create_model_version(MODEL, champion.source, run_id=champion.run_id),
        "move a stage": lambda: reader.transition_model_version_stage(MODEL, champion.version, "Archived"),
        "move the champion alias": lambda: reader.set_registered_model_alias(MODEL, "champion", "1"),
        "write the audit trail": lambda: reader.set_registered_model_tag(MODEL, "audit.x", "{}"),
    }
    for what, attempt in refusals.items():
        with pytest.raises(MlflowException) as refused:
            attempt()
        assert refused.value.error_code == "PERMISSION_DENIED", (what, refused.value)
    for command in (["rollback", "--model-name", MODEL], ["promote", *cli_args(team.cfg)]):
        result = subprocess.run(
            [sys.executable, "-m", "kd", *command],
            env=child_env(MLFLOW_TRACKING_URI=team.url),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2 and "error: the tracking server refused" in result.stderr and "Traceback" not in result.stderr, (
            result.stderr[-3000:]
        )

    monkeypatch.undo()
    assert ([e["when"] for e in history(MODEL)], admin.get_model_version_by_alias(MODEL, "champion").version) == before, "nothing changed"
    assert_roles_agree(MODEL)
    reliability.fault(
        "read-only user: register, stage, alias, audit tag, `registry rollback`, `registry promote`",
        "PERMISSION_DENIED / exit 2 with a clear error; registry unchanged; Production fetch works",
    )


def test_credentials_never_reach_params_tags_artifacts_or_logs(team, tmp_path, reliability):
    client = MlflowClient(team.url)
    found: list[str] = []

    def check(where: str, text: str) -> None:
        found.extend(f"{name} secret in {where}" for name, secret in SECRETS.items() if secret in text)

    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)
    assert runs
    for run in runs:
        check(f"run {run.info.run_id} params", json.dumps(run.data.params))
        check(f"run {run.info.run_id} tags", json.dumps(run.data.tags))
        local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / run.info.run_id)))
        for path in (p for p in local.rglob("*") if p.is_file()):
            check(f"artifact {path.relative_to(tmp_path)}", path.read_bytes().decode("latin-1"))
    for model in client.search_registered_models():
        check(f"model {model.name}", json.dumps({"tags": model.tags, "description": model.description}))
        for version in client.search_model_versions(f"name = '{model.name}'"):
            check(
                f"{model.name} v{version.version}",
                json.dumps({"tags": version.tags, "description": version.description, "source": version.source}),
            )
    for step, output in team.logs.items():
        check(f"output of {step}", output)
    check("server log", team.server_log.read_text())
    assert not found, found
    reliability.fault(
        f"secrets planted (S3 key, database password, two logins); searched {len(runs)} runs' params, tags and artifacts, "
        "the registry, CLI and server logs",
        "no secret found anywhere",
    )
