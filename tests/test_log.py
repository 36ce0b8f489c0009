"""What a step says along the way goes through one logger per step, in one format, behind one switch: ``kd <command>
--quiet`` leaves warnings only, the default shows every step's progress as ``<step>: message``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.log import logger, set_verbosity

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def verbosity():
    yield set_verbosity
    set_verbosity("normal")


def test_messages_carry_their_step_and_reach_the_stream_of_the_moment(capsys, verbosity) -> None:
    logger("prepare").info("200 images")
    logger().info("teacher resnet: fold 1 F1 0.9")
    assert capsys.readouterr().out == "prepare: 200 images\nteacher resnet: fold 1 F1 0.9\n"


def test_quiet_keeps_warnings_and_verbose_adds_debug(capsys, verbosity) -> None:
    verbosity("quiet")
    logger("search").info("trial 3 skipped")
    logger("registry").warning("repaired the champion alias")
    assert capsys.readouterr() == ("", "registry: repaired the champion alias\n"), "warnings only, on stderr"
    verbosity("verbose")
    logger("search").debug("sampler state")
    assert capsys.readouterr().out == "search: sampler state\n"


@pytest.mark.slow
def test_kd_prepare_says_what_it_read_unless_told_to_be_quiet(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    common = ["--synthetic_images", "40", "--image_size", "32", "--folds", "2", "--cache_dir", str(tmp_path / "cache")]

    def prepare(*extra: str) -> str:
        done = subprocess.run([sys.executable, "-m", "kd", "prepare", *common, *extra], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert "prepare: 40 images" in prepare()
    assert "prepare:" not in prepare("--quiet")
