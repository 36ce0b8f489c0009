"""The thin CLI wrapper every step shares: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, NoReturn

from mlflow.exceptions import MlflowException

from pipelines.config import PipelineError, redact_url
from pipelines.tracking import name_launched_run, unreachable


def run_cli(step: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser, argv: list[str] | None = None) -> Any:
    args = parser.parse_args(argv)
    try:
        name_launched_run()
        return step(args)
    except PipelineError as error:
        fail(str(error))
    except MlflowException as error:
        if unreachable(error):
            fail(f"the tracking server did not answer, even after retries with backoff ({str(error)[:300]}); check that it runs and MLFLOW_TRACKING_URI")
        if error.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            fail(f"the tracking server refused: {error.message}; log in (MLFLOW_TRACKING_USERNAME/PASSWORD) as a user an admin granted the permission")
        raise


def fail(message: str) -> NoReturn:
    """One line on stderr, passwords in URLs hidden, exit code 2."""
    print(f"error: {redact_url(message)}", file=sys.stderr)
    sys.exit(2)
