"""Data files as every reader meets them: their checks before anything is read (names, links, declared sizes), their
hash, and their names as messages show them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipelines.config import PipelineError

# Decompression-bomb guard: the largest real scans here are 1920x1080; 50 Mpx leaves room, refuses bombs.
MAX_PIXELS = 50_000_000


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB chunks so large volumes never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shown(path: Path | str) -> str:
    """A path as messages show it: bytes that are not UTF-8 (possible in Linux file names) as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_data_file(path: Path, data_root: Path) -> None:
    """Refuse what would break lineage or logging later: non-UTF-8 names, broken links, links out of the data.

    Only files under ``data_dir`` are covered by its digest and logged as its source, and MLflow writes
    file names as UTF-8; a symbolic link elsewhere would silently train on data the run does not describe.
    """
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise PipelineError(f"{shown(path)}: file name is not valid UTF-8; rename the file (MLflow logs file names as UTF-8)") from None
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symbolic link loop
        raise PipelineError(f"{path}: cannot follow this symbolic link ({error}); remove it") from None
    if not target.exists():
        raise PipelineError(f"{path}: broken symbolic link (target {target} does not exist); remove the link or restore its target")
    if not target.is_relative_to(data_root.resolve()):
        raise PipelineError(
            f"{path}: links to {target}, outside data_dir {data_root}; copy the file into the data folder instead of linking it"
        )
