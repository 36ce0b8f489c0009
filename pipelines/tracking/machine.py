"""What a measurement ran on: the machine and the software, described one way for the report's ``environment.json``
and the benchmarks' results (``machine``), so the two can be read side by side."""

from __future__ import annotations

import os
import platform
import tomllib
from importlib import metadata
from pathlib import Path

from pipelines.config import PROJECT_ROOT


def pinned_requirements() -> list[str]:
    """The project's pinned dependencies (``name==version``), as ``pyproject.toml`` lists them."""
    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    fallback = platform.processor() or platform.machine() or "unknown"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return fallback
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), fallback)


def describe_machine() -> dict:
    """Python and platform, the installed version of every pinned dependency, CPU model and logical CPUs, memory (GiB)
    and the GPUs TensorFlow sees.

    Keys: ``python``, ``platform``, ``packages`` (name -> version or ``not installed``), ``cpu``, ``cpu_count``,
    ``memory_gib``, ``gpus`` (device names). Reports read these keys from runs logged long ago: add keys, never rename.
    """
    import tensorflow as tf

    packages = {}
    for requirement in pinned_requirements():
        name = requirement.split("==")[0].split("[")[0]
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "gpus": [device.name for device in tf.config.list_physical_devices("GPU")],
    }
