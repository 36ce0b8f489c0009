"""``kd server``: the tracking + registry service (``make server``).

``mlflow server`` with a SQLAlchemy backend (SQLite by default, PostgreSQL for a team) and artifacts
proxied to local disk or any S3-compatible store through boto3 (``MLFLOW_S3_ENDPOINT_URL`` for a
non-AWS endpoint). ``--auth`` starts MLflow's basic-auth app: every request needs a login, users read
by default and need EDIT/MANAGE permissions (granted by the admin) to log runs, register or promote, and a
creator role (``registry/access.py``) to create experiments or registered models.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipelines.config import PROJECT_ROOT, PipelineError
from pipelines.log import logger

ADMIN_PASSWORD_ENV, SECRET_KEY_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"


def server_command(backend_store_uri: str, artifacts_destination: str, host: str, port: int, auth: bool = False) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "2",
    ]
    return command + (["--app-name", "basic-auth"] if auth else [])


def auth_environment(auth_database_uri: str, config_path: Path) -> dict[str, str]:
    """Write the basic-auth app's settings and return the environment that points MLflow at them.

    Users get READ on everything unless granted more; the admin (``admin``) is created on first start with
    the password from ``MLFLOW_AUTH_ADMIN_PASSWORD``: no password is ever written to a file here.
    """
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {auth_database_uri}\n"
        "admin_username = admin\n"
        # MLflow's login plus one rule: creating experiments and registered models needs the admin's grant.
        "authorization_function = registry.access:authenticate_request\n"
        # Checking a password costs a PBKDF2 hash; a training run logs every epoch. A password change
        # reaches the other server workers within this many seconds.
        "auth_cache_ttl_seconds = 60\n"
    )
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config_path)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_model(
    model_uri: str, tracking_uri: str, timeout: float = 180, wrapped: bool = False, workers: int = 1
) -> tuple[subprocess.Popen, int]:
    """`mlflow models serve` (``wrapped``: ``kd serve``) on a free loopback port as a user runs it
    (this environment's bin first on PATH, no run or experiment leaked from the caller), returned once it answers /ping.
    ``workers``: `mlflow models serve --workers` (``kd serve`` has one)."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", MLFLOW_TRACKING_URI=tracking_uri)
    command = (
        [sys.executable, "-m", "kd", "serve"]
        if wrapped
        else [f"{bin_dir}/mlflow", "models", "serve", "--env-manager", "local", "--workers", str(workers)]
    )
    server = subprocess.Popen(
        command + ["-m", model_uri, "-p", str(port), "-h", "127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return server, port
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                # its stderr says why; the refused /ping only says that it did not answer
                raise RuntimeError(f"{' '.join(command[:3])} did not start: {server.stderr.read()[-3000:]}") from None
            time.sleep(0.5)


def start_server(
    backend_store_uri: str, artifacts_destination: str, host: str, port: int, auth: bool = False, auth_database_uri: str = ""
) -> None:
    """Replace this process by the tracking server (``auth``: with basic-auth logins kept in ``auth_database_uri``)."""
    if auth:
        os.environ.update(auth_environment(auth_database_uri, PROJECT_ROOT / ".cache" / "basic_auth.ini"))
        if not os.environ.get(SECRET_KEY_ENV):
            raise PipelineError(
                f"--auth needs {SECRET_KEY_ENV} (a random string, the same on every server of the team: it signs the CSRF tokens)"
            )
        if not os.environ.get(ADMIN_PASSWORD_ENV):
            logger("server").warning(
                f"on first start the admin user needs a password: set {ADMIN_PASSWORD_ENV} (MLflow refuses to start without one)"
            )
    command = server_command(backend_store_uri, artifacts_destination, host, port, auth)
    logger("server").info("starting " + " ".join(command))
    os.execv(command[0], command)
