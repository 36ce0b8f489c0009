"""Creation rights on the team server, over HTTP: with ``default_permission = READ`` a logged-in user without
the admin's grant can neither create an experiment nor a registered model (so nobody claims the team's model
name first); the admin grants and takes back the right through MLflow's own client API (a role with a
workspace-wide USE grant). A light server of its own (SQLite, local artifacts) beside tests/test_server.py's.
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.request

import pytest
from kdtest import child_env
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client
from test_server import wait_until_up

from registry.server import auth_environment, free_port, server_command

pytestmark = pytest.mark.slow
ADMIN, USER = ("admin", "kd-admin-pw-5e1c"), ("alice", "kd-alice-pw-0b7d")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("access")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **child_env(),
        **auth_environment(f"sqlite:///{root / 'auth.db'}", root / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "kd-access-test-key",
    }
    log = root / "server.log"
    process = subprocess.Popen(
        server_command(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), "127.0.0.1", port, auth=True),
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_up(url, process, log)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
            patch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
            get_app_client("basic-auth", tracking_uri=url).create_user(*USER)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _post(url: str, path: str, body: dict, login: tuple[str, str]) -> int:
    token = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
    request = urllib.request.Request(
        f"{url}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _creates(url: str, login: tuple[str, str], suffix: str) -> dict[str, int]:
    """HTTP status of creating an experiment and a registered model, on the REST API and the UI's ajax API."""
    return {
        f"{api} {kind}": _post(url, f"/{api}/2.0/mlflow/{kind}/create", {"name": f"{kind}-{api}-{suffix}"}, login)
        for api in ("api", "ajax-api")
        for kind in ("experiments", "registered-models")
    }


def test_a_user_without_the_admins_grant_cannot_create_experiments_or_registered_models(server, monkeypatch, reliability):
    admin = MlflowClient(server)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    admin.create_registered_model("brain-tumor-student")  # the admin claims the team's name
    auth = get_app_client("basic-auth", tracking_uri=server)

    assert set(_creates(server, USER, "before").values()) == {403}, "a read-only user was allowed to create"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER[1])
    user = MlflowClient(server)
    for attempt in (lambda: user.create_experiment("claimed"), lambda: user.create_registered_model("brain-tumor-student-2")):
        with pytest.raises(MlflowException) as refused:
            attempt()
        assert refused.value.error_code == "PERMISSION_DENIED", refused.value
    assert user.search_experiments(), "reading still works"

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    role = auth.create_role("default", "creators", "may create experiments and registered models")
    auth.add_role_permission(role.id, "workspace", "*", "USE")
    auth.assign_role(USER[0], role.id)
    assert set(_creates(server, USER, "granted").values()) == {200}, "the granted user could not create"
    auth.unassign_role(USER[0], role.id)
    assert set(_creates(server, USER, "revoked").values()) == {403}, "the grant was taken back but still works"
    assert set(_creates(server, ADMIN, "admin").values()) == {200}

    names = {model.name for model in admin.search_registered_models()}
    assert not any(name.endswith(("before", "revoked")) for name in names) and "brain-tumor-student-2" not in names, names
    reliability.fault(
        "a logged-in user without a grant creates experiments and registered models (REST, ajax API, MLflow client), "
        "then with the admin's creator role, then after it is taken back",
        "HTTP 403 / PERMISSION_DENIED without the grant, 200 with it; nothing created",
    )
