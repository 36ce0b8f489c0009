"""One description of the machine and software, for the report's environment.json and the benchmarks' results."""

from __future__ import annotations

import platform
from importlib import metadata

from pipelines.tracking.machine import describe_machine, pinned_requirements


def test_the_description_names_the_python_every_pinned_package_and_the_hardware():
    described = describe_machine()
    assert described["python"] == platform.python_version()
    pinned = {requirement.split("==")[0].split("[")[0]: requirement.split("==")[1] for requirement in pinned_requirements()}
    assert set(described["packages"]) == set(pinned)
    assert described["packages"]["keras"] == metadata.version("keras")
    assert described["cpu"] and described["cpu_count"] >= 1 and described["memory_gib"] > 0
    assert isinstance(described["gpus"], list)
