"""``python -m registry.server``: the tracking + registry service (``make server``).

``mlflow server`` with a SQLAlchemy backend (SQLite by default, PostgreSQL for a team) and artifacts
proxied to local disk or any S3-compatible store through boto3 (``MLFLOW_S3_ENDPOINT_URL`` for a
non-AWS endpoint). ``--auth`` starts MLflow's basic-auth app.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipelines.config import PROJECT_ROOT


def server_command(backend_store_uri: str, artifacts_destination: str, host: str, port: int, auth: bool = False) -> list[str]:
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", artifacts_destination,
        "--serve-artifacts",
        "--host", host, "--port", str(port),
        "--workers", "2",
    ]
    return command + (["--app-name", "basic-auth"] if auth else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Start the MLflow tracking and model-registry server.")
    parser.add_argument("--backend-store-uri", default=os.environ.get("KD_BACKEND_STORE_URI", f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"), help="SQLAlchemy URL of the tracking store")
    parser.add_argument("--artifacts-destination", default=os.environ.get("KD_ARTIFACTS_DESTINATION", str(PROJECT_ROOT / "mlartifacts")), help="local folder or s3://bucket/prefix")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--auth", action="store_true", help="require MLflow basic-auth logins")
    args = parser.parse_args(argv)
    command = server_command(args.backend_store_uri, args.artifacts_destination, args.host, args.port, args.auth)
    print("starting:", " ".join(command), flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
