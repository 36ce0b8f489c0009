"""The thin CLI wrapper every command shares (``kd <command>``, the benchmarks): user errors become one line on
stderr and exit code 2.

Light on purpose: a command's arguments are parsed and checked before its module (TensorFlow, MLflow, the data)
is imported, so a bad argument is refused in a fraction of a second instead of after a minute of imports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from pipelines.config import PipelineError, redact_url


def run_cli(
    step: Callable[[Any], Any],
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
    check: Callable[[argparse.Namespace], Any] | None = None,
) -> Any:
    """Parse ``argv``, ``check`` the arguments (cheap: nothing heavy imported yet), then run ``step`` on the result."""
    args = parser.parse_args(argv)
    try:
        return step(check(args) if check else args)
    except PipelineError as error:
        fail(str(error))
    except Exception as error:
        mlflow_exceptions = sys.modules.get("mlflow.exceptions")  # an MlflowException needs MLflow imported
        if mlflow_exceptions is None or not isinstance(error, mlflow_exceptions.MlflowException):
            raise
        from pipelines.tracking.runs import unreachable

        if unreachable(error):
            fail(
                f"the tracking server did not answer, even after retries with backoff ({str(error)[:300]});"
                " check that it runs and MLFLOW_TRACKING_URI"
            )
        if error.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            fail(
                f"the tracking server refused: {error.message}; log in (MLFLOW_TRACKING_USERNAME/PASSWORD)"
                " as a user an admin granted the permission"
            )
        raise


def fail(message: str) -> NoReturn:
    """One line on stderr, passwords in URLs hidden, exit code 2."""
    print(f"error: {redact_url(message)}", file=sys.stderr)
    sys.exit(2)
