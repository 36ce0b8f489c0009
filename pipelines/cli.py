"""The thin CLI wrapper every step shares: user errors become one line on stderr and exit code 2.

Light on purpose: a step's arguments are parsed and its whole :class:`Config` checked before the step's module
(TensorFlow, MLflow, the data) is imported, so ``python -m pipelines <step>`` refuses a bad argument in a
fraction of a second instead of after a minute of imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from pipelines.config import DATA_PARAMS, PipelineError, build_parser, config_from_args, redact_url

# step -> (function run with the Config, description, the Config fields it takes; None = all)
STEPS = {
    "prepare": (
        "pipelines.prepare:prepare",
        "Ingest, decode and split the data; log the manifest and splits to MLflow.",
        DATA_PARAMS + ("data_dir", "synthetic_images", "synthetic_classes", "experiment_name", "cache_dir"),
    ),
    "teacher": (
        "pipelines.teacher:train_teacher",
        "Train one teacher per fold and one on all training data (reused when already trained).",
        None,
    ),
    "distill": ("pipelines.distill:distill", "Distil a student from the teachers (trained first when missing), cross-validated.", None),
    "main": ("pipelines.main:run_main", "Run prepare -> teacher -> search -> promote, reusing finished steps.", None),
}


def run_step(name: str, argv: list[str] | None = None) -> Any:
    """Parse and check the step's arguments, then import the step and run it."""
    target, description, names = STEPS[name]

    def step(cfg) -> Any:
        module, function = target.split(":")
        return getattr(importlib.import_module(module), function)(cfg)

    # config_from_args refuses a bad argument before anything heavy is imported
    return run_cli(step, build_parser(description, names), argv, check=config_from_args)


def run_cli(
    step: Callable[[Any], Any],
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
    check: Callable[[argparse.Namespace], Any] | None = None,
) -> Any:
    """Parse ``argv``, ``check`` the arguments (cheap: nothing heavy imported yet), then run ``step`` on the result."""
    args = parser.parse_args(argv)
    try:
        checked = check(args) if check else args
        if os.environ.get("MLFLOW_RUN_ID"):  # launched by `mlflow run`: name its run after the entry point
            from pipelines.tracking import name_launched_run

            name_launched_run()
        return step(checked)
    except PipelineError as error:
        fail(str(error))
    except Exception as error:
        mlflow_exceptions = sys.modules.get("mlflow.exceptions")  # an MlflowException needs MLflow imported
        if mlflow_exceptions is None or not isinstance(error, mlflow_exceptions.MlflowException):
            raise
        from pipelines.tracking import unreachable

        if unreachable(error):
            fail(
                f"the tracking server did not answer, even after retries with backoff ({str(error)[:300]}); check that it runs and MLFLOW_TRACKING_URI"
            )
        if error.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            fail(
                f"the tracking server refused: {error.message}; log in (MLFLOW_TRACKING_USERNAME/PASSWORD) as a user an admin granted the permission"
            )
        raise


def fail(message: str) -> NoReturn:
    """One line on stderr, passwords in URLs hidden, exit code 2."""
    print(f"error: {redact_url(message)}", file=sys.stderr)
    sys.exit(2)
