"""The code fingerprint: a finished step is reused only when the code that shapes a model is the code that trained it.

The end-to-end test runs the teacher step on a copy of the package sources, so it can edit a model builder there
and watch the teacher retrain, without touching the checkout under test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from kdtest import child_env, tracking_at
from mlflow import MlflowClient

from pipelines.config import TEACHER_PARAMS, Config
from pipelines.fingerprint import FINGERPRINTED_MODULES, code_fingerprint, fingerprint_sources
from pipelines.names import RunTag
from pipelines.tracking import reuse_finished, step_key

ROOT = Path(__file__).resolve().parents[1]
# How a step is started from the command line; the arguments after it are the step's name and options.
STEP_COMMAND = (sys.executable, "-m", "kd")
TINY_TEACHER = [
    "--synthetic_images", "20", "--image_size", "32", "--folds", "2", "--epochs", "1", "--patience", "0",
    "--batch_size", "16", "--experiment_name", "fingerprint",
]  # fmt: skip
# A model-shaping edit: the teacher's stem convolution gets a 5 x 5 kernel instead of 3 x 3 (more parameters).
STEM_BEFORE = 'layers.Conv2D(widths[0], 3, padding="same"'
STEM_AFTER = 'layers.Conv2D(widths[0], 5, padding="same"'


def copy_sources(target: Path) -> Path:
    """Every top-level package of the project (``pipelines``, ``kd``, ...) copied into ``target``, which is returned."""
    for package in sorted(path.parent for path in ROOT.glob("*/__init__.py")):
        if package.name != "tests":
            shutil.copytree(package, target / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_the_fingerprint_changes_with_a_fingerprinted_module_and_not_with_another_file(tmp_path):
    copy = copy_sources(tmp_path / "src")
    before = fingerprint_sources(copy)
    assert before == code_fingerprint(), "the same sources at another path have the same fingerprint"

    cli = copy / "pipelines" / "cli.py"
    cli.write_text(cli.read_text() + "\n# a change to the command line only\n")
    assert fingerprint_sources(copy) == before, "a module outside FINGERPRINTED_MODULES does not shape a model"

    models = copy / "pipelines" / "models.py"
    assert STEM_BEFORE in models.read_text(), "the edit below must change the teacher's stem"
    models.write_text(models.read_text().replace(STEM_BEFORE, STEM_AFTER))
    assert fingerprint_sources(copy) != before


def test_every_fingerprinted_module_exists_so_renaming_one_fails_here_and_not_silently():
    assert all((ROOT / name).is_file() for name in FINGERPRINTED_MODULES), FINGERPRINTED_MODULES


def test_line_endings_do_not_change_the_fingerprint(tmp_path):
    copy = copy_sources(tmp_path / "src")
    before = fingerprint_sources(copy)
    for name in FINGERPRINTED_MODULES:
        (copy / name).write_bytes((copy / name).read_bytes().replace(b"\n", b"\r\n"))
    assert fingerprint_sources(copy) == before


def test_a_finished_run_of_other_code_is_not_reused_and_one_of_this_code_is(tmp_path):
    cfg = Config()
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        mlflow.set_experiment("fingerprint")
        runs = {}
        for code in ("0" * 64, code_fingerprint()):
            with mlflow.start_run() as run:
                tags = {
                    RunTag.STEP: "teacher",
                    RunTag.OUTCOME: "trained",
                    RunTag.DATA_DIGEST: "d" * 64,
                    RunTag.PARAMS: step_key(cfg, TEACHER_PARAMS),
                }
                mlflow.set_tags({**tags, RunTag.CODE: code})
            runs[code] = run.info.run_id
            # Only the run of this process's code is ever found, whether it is the newest or not.
            found = reuse_finished("teacher", cfg, TEACHER_PARAMS, "d" * 64, nested=True)
            assert found == runs.get(code_fingerprint())


def run_teacher(sources: Path, work: Path) -> subprocess.CompletedProcess:
    """The teacher step on the tiny synthetic set, importing the package from ``sources`` (cwd ``work``, which
    ``python -m`` puts first on sys.path, holds no package)."""
    env = child_env(PYTHONPATH=str(sources), MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    command = [*STEP_COMMAND, "teacher", *TINY_TEACHER, "--cache_dir", str(work / "cache")]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_teacher_is_reused_by_the_same_code_and_retrained_after_its_model_changes(tmp_path):
    sources, work = copy_sources(tmp_path / "src"), tmp_path / "work"
    work.mkdir()
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")

    def trained() -> list:
        experiment = client.get_experiment_by_name("fingerprint")
        return client.search_runs(
            [experiment.experiment_id],
            f"tags.`{RunTag.STEP}` = 'teacher' and tags.`{RunTag.OUTCOME}` = 'trained'",
            order_by=["start_time ASC"],
        )

    run_teacher(sources, work)
    [first] = trained()
    assert first.data.tags[RunTag.CODE] == fingerprint_sources(sources) == code_fingerprint(), "the copy runs this checkout's code"

    again = run_teacher(sources, work)
    assert f"reusing finished run {first.info.run_id}" in again.stdout, again.stdout[-3000:]
    assert [run.info.run_id for run in trained()] == [first.info.run_id], "the same code trains nothing new"

    models = sources / "pipelines" / "models.py"
    assert models.read_text().count(STEM_BEFORE) == 1, "the edit below must hit build_teacher's stem"
    models.write_text(models.read_text().replace(STEM_BEFORE, STEM_AFTER))
    run_teacher(sources, work)
    old, new = trained()
    assert old.info.run_id == first.info.run_id and new.info.run_id != first.info.run_id
    assert new.data.tags[RunTag.CODE] == fingerprint_sources(sources) != first.data.tags[RunTag.CODE]
    assert new.data.metrics["teacher_params"] > first.data.metrics["teacher_params"], "the new teacher was built by the edited code"
