"""The team setup, for real: `mlflow server` on PostgreSQL with S3 artifacts (moto's S3 server on loopback),
and train -> register -> promote -> fetch -> serve through it over HTTP; the artifacts land in the bucket."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request

import boto3
import mlflow
import pytest
from moto.server import ThreadedMotoServer

from kdtest import MODEL, assert_roles_agree, check_serving, free_port, tiny_config
from registry.promote import promote
from registry.server import server_command
from search.tune import run_search

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
S3_KEYS = {"AWS_ACCESS_KEY_ID": "kd-test-key", "AWS_SECRET_ACCESS_KEY": "kd-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_endpoint():
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    moto.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        moto.stop()


@pytest.fixture
def tracking_server(postgres_uri, s3_endpoint, tmp_path, monkeypatch):
    for key, value in {**S3_KEYS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="kd-artifacts")
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(server_command(postgres_uri, "s3://kd-artifacts/mlflow", "127.0.0.1", port), env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise AssertionError((tmp_path / "server.log").read_text()[-3000:])
            time.sleep(1)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(url)
    try:
        yield url
    finally:
        mlflow.set_tracking_uri(previous)
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_train_register_promote_fetch_serve_through_postgresql_and_s3(tracking_server, s3_endpoint, postgres_databases, mri_subset, real_data_dir, tmp_path):
    cfg = tiny_config(mri_subset, tmp_path, storage=postgres_databases(), n_trials=1)
    run_search(cfg)
    promotion = promote(cfg)
    assert promotion.promoted
    assert_roles_agree(MODEL)

    keys = [item["Key"] for page in boto3.client("s3", endpoint_url=s3_endpoint).get_paginator("list_objects_v2").paginate(Bucket="kd-artifacts") for item in page.get("Contents", [])]
    assert any(key.endswith("logits/teacher_logits.npz") for key in keys), "teacher artifacts are in the bucket"
    assert any(key.endswith("artifacts/student.keras") for key in keys), "the registered model is in the bucket"
    assert any(key.endswith("MLmodel") for key in keys)

    files = sorted((real_data_dir / "yes").iterdir())[:2] + sorted((real_data_dir / "no").iterdir())[:2]
    check_serving(MODEL, tracking_server, files)
