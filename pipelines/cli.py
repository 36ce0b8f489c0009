"""The thin CLI wrapper every step shares: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from pipelines.config import PipelineError


def run_cli(step: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser, argv: list[str] | None = None) -> Any:
    args = parser.parse_args(argv)
    try:
        return step(args)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
