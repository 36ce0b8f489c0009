"""The code fingerprint: a hash of the sources that shape a trained model, so a finished step is reused only when
the code that would train it again is the code that trained it (see ``pipelines.tracking.reuse_finished``)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

# The folder holding the ``pipelines`` package: file names below are relative to it, so a checkout anywhere on disk
# (a clone, a worktree, an MLflow project copy) has the same fingerprint for the same sources.
SOURCE_ROOT = Path(__file__).resolve().parent.parent

# The modules whose source decides what a step trains: preprocessing and splits, the networks, the Distiller, the
# training loop and the steps that wire them (the teacher's trainer, the all-data epochs, the student's build, its
# quantization-aware fine-tuning).
# Update this list when such code moves to another module; a module left out lets old models pass for new ones.
FINGERPRINTED_MODULES = (
    "pipelines/sources.py",
    "pipelines/images.py",
    "pipelines/splits.py",
    "pipelines/prepare.py",  # the minority class and the imbalance ratio's training rows
    "pipelines/models.py",
    "pipelines/distiller.py",
    "pipelines/training.py",
    "pipelines/teacher.py",
    "pipelines/distill.py",
    "pipelines/quantize.py",
)


def fingerprint_sources(root: Path, modules: Sequence[str] = FINGERPRINTED_MODULES) -> str:
    """SHA-256 over each module's relative name and bytes (line endings as ``\\n``, so a Windows checkout agrees)."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        source = (root / name).read_bytes().replace(b"\r\n", b"\n")
        # Name and length first: moving code from one module to the next changes the fingerprint too.
        digest.update(f"{name}\0{len(source)}\0".encode() + source)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """This process's fingerprint, read once (at its first run), so an edit while it trains does not relabel its runs."""
    return fingerprint_sources(SOURCE_ROOT)
