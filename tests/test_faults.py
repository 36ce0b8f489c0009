"""Faults injected into real processes on real PostgreSQL: kill -9 of a teacher run, of promotions at several
points, and of the tracking server under a running step; two promotions racing for one model.

After each fault and a restart: no MLflow run is left RUNNING (a dead process's run is closed KILLED with
the reason), stage and alias point at a READY version that loads and predicts, and nothing finished is redone.
Every fault and every loss count goes into RELIABILITY.md through the ``reliability`` fixture.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from kdtest import MODEL, assert_roles_agree, child_env, cli_args, tiny_config, tracking_at
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from pipelines.config import PROJECT_ROOT
from pipelines.tracking.runs import unreachable
from registry.model import encode_file
from registry.roles import history
from registry.server import free_port, server_command
from search.tune import run_search

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
BIN = Path(sys.executable).parent
# The kill points are drawn at random, reproducibly: KD_FAULT_SEED picks another draw.
RNG = random.Random(int(os.environ.get("KD_FAULT_SEED", "7")))


def all_runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)


def left_running(tracking_uri: str) -> list[str]:
    """Runs still RUNNING: each one is a run lost to a fault."""
    return [
        f"{r.info.run_id} ({r.data.tags.get('kd.step', '?')})" for r in all_runs(MlflowClient(tracking_uri)) if r.info.status == "RUNNING"
    ]


def start(command: list[str], tracking_uri: str, log: Path, **env: str) -> subprocess.Popen:
    """A CLI in its own process group, so kill -9 takes it and every child it started."""
    return subprocess.Popen(
        command,
        env=child_env(MLFLOW_TRACKING_URI=tracking_uri, **env),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=PROJECT_ROOT,
    )


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    process.wait(timeout=60)


def finish(process: subprocess.Popen, log: Path, timeout: float = 900) -> str:
    process.wait(timeout=timeout)
    output = log.read_text()
    assert process.returncode == 0, output[-4000:]
    return output


def wait_for(condition, what: str, process: subprocess.Popen, log: Path, timeout: float = 300, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(f"the process ended before {what}: {log.read_text()[-3000:]}")
        time.sleep(every)
    kill_group(process)
    pytest.fail(f"timed out waiting for {what}")


def teacher_runs(client: MlflowClient, status: str | None = None) -> list:
    runs = [r for r in all_runs(client) if r.data.tags.get("kd.step") == "teacher"]
    return [r for r in runs if status is None or r.info.status == status]


def test_a_killed_teacher_run_is_closed_and_trained_once_on_restart(mri_subset, postgres_uri, tmp_path, reliability):
    command = [
        str(BIN / "mlflow"),
        "run",
        str(PROJECT_ROOT),
        "-e",
        "teacher",
        "--env-manager",
        "local",
        "--experiment-name",
        "faults",
        "-P",
        f"data_dir={mri_subset}",
        "-P",
        "image_size=32",
        "-P",
        "folds=2",
        "-P",
        "epochs=6",
        "-P",
        "patience=6",
    ]
    client = MlflowClient(postgres_uri)
    victim = start(command, postgres_uri, tmp_path / "victim.log")
    # mid-training: after the first epoch's metrics, plus a random delay
    [run] = wait_for(
        lambda: [r for r in teacher_runs(client, "RUNNING") if r.data.metrics], "the teacher's first epoch", victim, tmp_path / "victim.log"
    )
    delay = RNG.uniform(0, 3)
    time.sleep(delay)
    kill_group(victim)
    assert client.get_run(run.info.run_id).info.status == "RUNNING", "kill -9 left the run RUNNING: the fault is real"

    finish(start(command, postgres_uri, tmp_path / "restart.log"), tmp_path / "restart.log")
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED" and "died" in killed.data.tags["kd.failure"]
    trained = [r for r in teacher_runs(client, "FINISHED") if r.data.tags.get("kd.outcome") == "trained"]
    assert len(trained) == 1

    again = finish(start(command, postgres_uri, tmp_path / "again.log"), tmp_path / "again.log")
    assert f"reusing finished run {trained[0].info.run_id}" in again, "a finished teacher is never trained again"
    assert len([r for r in teacher_runs(client) if r.data.tags.get("kd.outcome") == "trained"]) == 1
    lost = left_running(postgres_uri)
    assert not lost, lost
    reliability.fault(
        f"kill -9 of `mlflow run -e teacher` (process group) {delay:.1f} s after its first epoch",
        "run closed KILLED with the reason by the restart; teacher trained once, then reused",
    )
    reliability.lost("runs", len(lost), "teacher run killed mid-training")


@pytest.fixture(scope="module")
def study(mri_subset, module_postgres_databases, tmp_path_factory):
    """A finished tiny search, tracked in PostgreSQL (the study in another PostgreSQL database)."""
    root = tmp_path_factory.mktemp("faults")
    tracking_uri = module_postgres_databases()
    cfg = tiny_config(mri_subset, root, storage=module_postgres_databases(), experiment_name="faults")
    with tracking_at(tracking_uri):
        run_search(cfg)
        yield cfg, tracking_uri


def promote_command(cfg, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kd", "promote", *cli_args(cfg), *extra]


def check_champion_serves(tracking_uri: str, image: Path, roles_agree: bool = True) -> str:
    """The alias and the stage point at READY versions that load and predict (the same one, where the roles
    must agree: a promotion killed inside the stage/alias move leaves them apart until the next start repairs)."""
    with tracking_at(tracking_uri):
        if roles_agree:
            assert_roles_agree(MODEL)
        client = MlflowClient()
        champion = client.get_model_version_by_alias(MODEL, "champion")
        assert champion.status == "READY"
        for uri in (f"models:/{MODEL}@champion", f"models:/{MODEL}/Production"):
            prediction = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [encode_file(image)]}))
            assert prediction["prob_yes"].between(0, 1).all(), uri
        return champion.version


def test_promotions_killed_at_several_points_leave_a_loadable_champion(study, tmp_path, real_data_dir, reliability):
    cfg, tracking_uri = study
    client = MlflowClient(tracking_uri)
    image = sorted((real_data_dir / "yes").iterdir())[0]
    trial_runs = len([r for r in all_runs(client) if r.data.tags.get("kd.step") == "trial"])

    started = time.monotonic()
    finish(start(promote_command(cfg), tracking_uri, tmp_path / "first.log"), tmp_path / "first.log")
    duration = time.monotonic() - started
    first = check_champion_serves(tracking_uri, image)

    def versions() -> set[str]:
        return {v.version for v in client.search_model_versions(f"name = '{MODEL}'")}

    known = versions()
    # Where to kill a forced promotion: at a random moment, as soon as its version is registered (before the
    # gate), and as soon as that version reaches Production (inside the stage/alias move).
    kill_points = {
        "at a random moment": lambda: time.monotonic() - begun > delay,
        "right after registering its version": lambda: versions() - known,
        "as its version enters Production": lambda: [
            v for v in client.get_latest_versions(MODEL, stages=["Production"]) if v.version not in known
        ],
    }
    for point, reached in kill_points.items():
        delay = RNG.uniform(0.2, 1.0) * duration
        log = tmp_path / f"victim-{len(known)}.log"
        begun = time.monotonic()
        victim = start(promote_command(cfg, "--force", "true"), tracking_uri, log)
        wait_for(reached, point, victim, log, every=0.05)
        kill_group(victim)
        registered = sorted(versions() - known)
        champion = check_champion_serves(tracking_uri, image, roles_agree=False)  # before any restart: still loadable
        reliability.fault(
            f"kill -9 of a forced promotion {point}" + (f" ({delay:.0f} s in)" if point == "at a random moment" else ""),
            f"champion v{champion} still READY and loadable; {len(registered)} unrecorded version(s) left for the restart to clean",
        )
        known |= set(registered)

    last = finish(start(promote_command(cfg, "--force", "true"), tracking_uri, tmp_path / "restart.log"), tmp_path / "restart.log")
    final = check_champion_serves(tracking_uri, image)
    assert f"v{final} -> Production" in last
    events = history_of(tracking_uri)
    recorded = {e["version"] for e in events}
    assert versions() <= recorded, "every version left is in the audit trail; half-registered ones were deleted"
    # A victim killed after recording its promotion finished it: then it is in the chain, never half-done.
    promotions = [e for e in events if e["event"] == "promote"]
    assert promotions[0]["version"] == first and promotions[-1]["version"] == final
    assert all(later["previous"] == earlier["version"] for earlier, later in zip(promotions, promotions[1:])), promotions
    lost = left_running(tracking_uri)
    assert not lost, lost
    assert len([r for r in all_runs(client) if r.data.tags.get("kd.step") == "trial"]) == trial_runs, "the search is not redone"
    assert len([r for r in teacher_runs(client) if r.data.tags.get("kd.outcome") == "trained"]) == 1, "the teachers are not retrained"
    reliability.lost("runs", len(lost), "three promotions killed")
    reliability.lost("models", 0 if final in versions() and first in recorded else 1, "champion after three killed promotions")


def history_of(tracking_uri: str) -> list[dict]:
    with tracking_at(tracking_uri):
        return history(MODEL)


def test_two_promotions_racing_for_one_model_leave_one_champion(study, tmp_path, real_data_dir, reliability):
    cfg, tracking_uri = study
    name = "raced-student"
    racers = [start(promote_command(cfg, "--model_name", name), tracking_uri, tmp_path / f"racer-{k}.log") for k in range(2)]
    for k, racer in enumerate(racers):
        finish(racer, tmp_path / f"racer-{k}.log")
    with tracking_at(tracking_uri):
        assert_roles_agree(name)
        events = history(name)
        assert len(events) == 2, events
        assert events[0]["event"] == "promote" and events[0]["previous"] is None
        # The second promotion saw the first one's champion: the gate ran under the registry lock.
        assert events[1]["event"] in ("promote", "challenger") and events[1]["previous"] == events[0]["version"], events
        production = MlflowClient().get_latest_versions(name, stages=["Production"])
        assert len(production) == 1
    reliability.fault(
        "two promotions of one model started at the same moment",
        f"one champion (v{production[0].version}); history: {events[0]['event']} then {events[1]['event']} against it",
    )
    reliability.lost("models", 0, "racing promotions")


def start_server(backend: str, artifacts: Path, port: int, log: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        server_command(backend, str(artifacts), "127.0.0.1", port), stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                kill_group(server)
                raise AssertionError(log.read_text()[-3000:]) from None
            time.sleep(0.5)


def serve_forever(answer: bytes) -> str:
    """A server on loopback that reads each request, writes ``answer`` and hangs up; its URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize(
    "answer, away",
    [
        # a server killed between the headers and the body of its answer (CI saw it: IncompleteRead, never retried)
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n", True),
        # one that hangs up before answering at all, until MLflow's retries run out
        (b"", True),
        # a server that is there and refuses the request: not an outage, so not waited for
        (
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 59\r\n\r\n"
            b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}',
            False,
        ),
    ],
    ids=["cut-off-mid-answer", "hung-up", "refused-request"],
)
def test_a_tracking_server_that_stops_answering_counts_as_unreachable_and_one_that_refuses_does_not(answer, away, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with pytest.raises(MlflowException) as raised:
        MlflowClient(serve_forever(answer)).log_batch("0" * 32, metrics=[Metric("loss", 1.0, 0, 0)])
    assert unreachable(raised.value) == away, raised.value


@pytest.mark.parametrize("outage", ["short", "long"])
def test_the_tracking_server_going_away_mid_run(outage, mri_subset, postgres_uri, tmp_path, reliability):
    """A short outage is ridden out by the client's retries; a long one fails the step with a clear error, and
    the run is marked FAILED once the server is back."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(postgres_uri, tmp_path / "artifacts", port, tmp_path / "server.log")
    log = tmp_path / "step.log"
    command = [
        sys.executable,
        "-m",
        "kd",
        "teacher",
        "--data_dir",
        str(mri_subset),
        "--image_size",
        "32",
        "--folds",
        "2",
        "--epochs",
        "8",
        "--patience",
        "8",
        "--experiment_name",
        "outage",
        "--cache_dir",
        str(tmp_path / "cache"),
        "--tracking_wait_s",
        "120",
    ]
    # MLflow's own retry with backoff, made short for the test (its defaults ride out minutes).
    # Short: 7 retries back off 0, 2, 4, ... 64 s (about 2 min), as long as start_server waits for a restart, which takes
    # tens of seconds on 2 busy cores (5 retries, 30 s, ran out in CI); long: a few seconds.
    retries = "7" if outage == "short" else "2"
    step = start(
        command, url, log, MLFLOW_HTTP_REQUEST_MAX_RETRIES=retries, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1", MLFLOW_HTTP_REQUEST_TIMEOUT="10"
    )
    client = MlflowClient(url)
    try:
        [run] = wait_for(lambda: [r for r in teacher_runs(client, "RUNNING") if r.data.metrics], "the first epoch", step, log)
        kill_group(server)
        if outage == "short":
            time.sleep(2)
            server = start_server(postgres_uri, tmp_path / "artifacts", port, tmp_path / "server.log")
            finish(step, log)
            assert client.get_run(run.info.run_id).info.status == "FINISHED"
            reliability.fault("tracking server killed for 2 s under a running teacher step", "client retried with backoff; run FINISHED")
        else:
            wait_for(
                lambda: "unreachable" in log.read_text(),
                "the client giving up and waiting for the server",
                step,
                log,
                timeout=180,
                every=0.5,
            )
            server = start_server(postgres_uri, tmp_path / "artifacts", port, tmp_path / "server.log")
            step.wait(timeout=300)
            output = log.read_text()
            assert step.returncode == 2, output[-3000:]
            error = [line for line in output.splitlines() if line.startswith("error:")]
            assert error and "tracking server" in error[0] and "unreachable" in error[0] and "marked FAILED" in error[0], output[-3000:]
            assert "Traceback" not in output
            failed = client.get_run(run.info.run_id)
            assert failed.info.status == "FAILED" and "API request" in failed.data.tags["kd.failure"]
            reliability.fault(
                "tracking server killed under a running teacher step until the client gave up",
                "clear error, exit 2; run marked FAILED once the server was back",
            )
        lost = left_running(url)
        assert not lost, lost
        reliability.lost("runs", len(lost), f"tracking server outage ({outage})")
    finally:
        if step.poll() is None:
            kill_group(step)
        kill_group(server)
