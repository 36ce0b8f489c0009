"""The argparse layer over Config: one option per field (its help from the field's metadata), and back."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from pipelines.config.core import Config
from pipelines.config.values import LIMITS


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true or false")


def _parse_int(text: str) -> int:
    """Integers, also as MLflow may render them ("5.0")."""
    value = float(text)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def build_parser(
    description: str, names: Sequence[str] | None = None, add_help: bool = True, own_defaults: dict[str, Any] | None = None
) -> argparse.ArgumentParser:
    """An argparse parser whose options are Config fields (``--data_dir`` and ``--data-dir`` both work); ``own_defaults``:
    a command's own defaults for some fields (``kd compare``'s), shown in their help."""
    parser = argparse.ArgumentParser(description=description, add_help=add_help)
    defaults = Config(**(own_defaults or {}))
    for f in fields(Config):
        if names is not None and f.name not in names:
            continue
        kind = {bool: _parse_bool, int: _parse_int, float: float}.get(type(getattr(defaults, f.name)), str)
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        limits = f" (range {LIMITS[f.name]})" if f.name in LIMITS else ""
        own = f" (default here {getattr(defaults, f.name)})" if f.name in (own_defaults or {}) else ""
        parser.add_argument(
            *flags, dest=f.name, type=kind, default=getattr(defaults, f.name), help=f"{f.metadata.get('help')}{limits}{own}"
        )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in known})
