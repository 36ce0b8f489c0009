"""The code fingerprint: a finished step is reused only when the code it imports is the code that trained it.

The end-to-end test runs the teacher step on a copy of the package sources, so it can edit a model builder there
and watch the teacher retrain, without touching the checkout under test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import mlflow
import pytest
from kdtest import child_env, tracking_at
from mlflow import MlflowClient

from pipelines.config import DATA_INPUTS, DATA_PARAMS, DISTILL_PARAMS, REUSE_KEYS, TEACHER_ONLY_PARAMS, TEACHER_PARAMS, Config
from pipelines.fingerprint import (
    SOURCE_ROOT,
    STEP_MODULES,
    code_fingerprint,
    fingerprint_sources,
    import_closure,
    module_file,
    step_sources,
)
from pipelines.names import RunTag
from pipelines.tracking.runs import reuse_finished, step_key

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


def edit(path: Path, before: str, after: str) -> None:
    """Replace the one occurrence of ``before`` in ``path`` (the test fails if the code it aims at moved)."""
    text = path.read_text()
    assert text.count(before) == 1, f"{before!r} must occur once in {path.name}"
    path.write_text(text.replace(before, after))


def append_comment(path: Path) -> None:
    path.write_text(path.read_text() + "\n# an edit that changes no behaviour\n")


def test_the_fingerprint_changes_with_a_module_the_step_imports_and_not_with_another_file(tmp_path):
    copy = copy_sources(tmp_path / "src")
    before = fingerprint_sources(copy, "teacher")
    assert before == code_fingerprint("teacher"), "the same sources at another path have the same fingerprint"

    append_comment(copy / "pipelines" / "steps" / "cli.py")  # beside the step, not imported by it
    append_comment(copy / "registry" / "promote.py")
    assert fingerprint_sources(copy, "teacher") == before, "modules the teacher step does not import do not shape its model"

    edit(copy / "pipelines" / "models" / "builders.py", STEM_BEFORE, STEM_AFTER)
    assert fingerprint_sources(copy, "teacher") != before


@pytest.mark.parametrize(
    "module, step",
    [
        ("pipelines/training/views.py", "teacher"),  # the consistent-KD views whose logits a teacher run caches
        ("pipelines/training/views.py", "distill"),
        ("pipelines/config/core.py", "distill"),  # a comment was enough to be reused by a hand-kept list's omission
        ("pipelines/training/fit.py", "compare"),
    ],
)
def test_any_edit_to_a_module_in_the_steps_import_closure_changes_its_fingerprint(tmp_path, module, step):
    copy = copy_sources(tmp_path / "src")
    before = fingerprint_sources(copy, step)
    append_comment(copy / module)
    assert fingerprint_sources(copy, step) != before


def test_changing_what_a_student_preset_means_changes_the_distill_fingerprint(tmp_path):
    copy = copy_sources(tmp_path / "src")
    before = fingerprint_sources(copy, "distill")
    edit(copy / "pipelines" / "config" / "values.py", '"small": (16, 3)', '"small": (16, 2)')
    assert fingerprint_sources(copy, "distill") != before


def test_a_module_a_step_starts_importing_joins_its_fingerprint_also_from_inside_a_function(tmp_path):
    copy = copy_sources(tmp_path / "src")
    (copy / "pipelines" / "helper_for_test.py").write_text("VALUE = 1\n")
    assert "pipelines/helper_for_test.py" not in step_sources(copy, "teacher")
    teacher = copy / "pipelines" / "steps" / "teacher.py"
    teacher.write_text(teacher.read_text() + "\n\ndef late():\n    from pipelines import helper_for_test\n\n    return helper_for_test\n")
    assert "pipelines/helper_for_test.py" in step_sources(copy, "teacher")
    before = fingerprint_sources(copy, "teacher")
    (copy / "pipelines" / "helper_for_test.py").write_text("VALUE = 2\n")
    assert fingerprint_sources(copy, "teacher") != before


def test_import_closures_follow_relative_imports_and_skip_modules_outside_the_project(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("import os\nfrom ..top import VALUE\n")
    (package / "top.py").write_text("import numpy\nVALUE = 1\n")
    (package / "unused.py").write_text("")
    assert import_closure(tmp_path, "pkg.sub.leaf") == ["pkg/__init__.py", "pkg/sub/__init__.py", "pkg/sub/leaf.py", "pkg/top.py"]


def test_every_step_module_exists_so_renaming_one_fails_here_and_not_silently():
    assert all(module_file(SOURCE_ROOT, module) for module in STEP_MODULES.values()), STEP_MODULES


def test_every_config_field_names_the_reuse_keys_it_belongs_to():
    unclassified = [f.name for f in fields(Config) if "reuse" not in f.metadata]
    assert not unclassified, f"give these Config fields metadata['reuse'] (a tuple of {REUSE_KEYS}, or ()): {unclassified}"
    unknown = {f.name: f.metadata["reuse"] for f in fields(Config) if not set(f.metadata["reuse"]) <= set(REUSE_KEYS)}
    assert not unknown, unknown
    assert set(TEACHER_ONLY_PARAMS) <= set(DISTILL_PARAMS) and set(DATA_PARAMS) <= set(DATA_INPUTS)


def test_line_endings_do_not_change_the_fingerprint(tmp_path):
    copy = copy_sources(tmp_path / "src")
    before = fingerprint_sources(copy, "distill")
    for name in step_sources(copy, "distill"):
        (copy / name).write_bytes((copy / name).read_bytes().replace(b"\n", b"\r\n"))
    assert fingerprint_sources(copy, "distill") == before


def test_a_finished_run_of_other_code_is_not_reused_and_one_of_this_code_is(tmp_path):
    cfg = Config()
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        mlflow.set_experiment("fingerprint")
        runs = {}
        for code in ("0" * 64, code_fingerprint("teacher")):
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
            assert found == runs.get(code_fingerprint("teacher"))


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
    assert first.data.tags[RunTag.CODE] == fingerprint_sources(sources, "teacher") == code_fingerprint("teacher"), "this checkout's code"

    again = run_teacher(sources, work)
    assert f"reusing finished run {first.info.run_id}" in again.stdout, again.stdout[-3000:]
    assert [run.info.run_id for run in trained()] == [first.info.run_id], "the same code trains nothing new"

    edit(sources / "pipelines" / "models" / "builders.py", STEM_BEFORE, STEM_AFTER)
    run_teacher(sources, work)
    old, new = trained()
    assert old.info.run_id == first.info.run_id and new.info.run_id != first.info.run_id
    assert new.data.tags[RunTag.CODE] == fingerprint_sources(sources, "teacher") != first.data.tags[RunTag.CODE]
    assert new.data.metrics["teacher_params"] > first.data.metrics["teacher_params"], "the new teacher was built by the edited code"

    # An edit to a module the teacher imports without a model builder in it (the views it caches logits of) retrains too.
    append_comment(sources / "pipelines" / "training" / "views.py")
    run_teacher(sources, work)
    assert len(trained()) == 3
