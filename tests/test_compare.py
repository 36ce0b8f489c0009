"""The comparison (``kd compare``): imbalance subsamples the training folds only; a comparison killed with SIGKILL
resumes in its own run and ends with every cell once; two workers started together split the cells, none trained twice.
Real processes, real tiny training, real SQLite stores."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pytest
from kdtest import child_env

from pipelines.config import Config, PipelineError
from pipelines.names import Metric, RunTag
from pipelines.steps.prepare import imbalanced, prepare_data
from pipelines.tracking.locks import database_lock, teacher_lock

TINY = ["--synthetic_images", "60", "--image_size", "32", "--folds", "2", "--repeats", "1", "--epochs", "1", "--patience", "1"]
# KD and no-KD at two ratios (4 cells, a teacher per ratio); two students at one ratio (4 cells, one teacher)
RATIOS = ["--teachers", "resnet:S", "--students", "2x1", "--imbalance", "0,2"]
STUDENTS = ["--teachers", "resnet:S", "--students", "2x1,4x1", "--imbalance", "0"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic set, decoded once, for every test of the module."""
    return tmp_path_factory.mktemp("compare-cache")


def start_comparison(root: Path, cache_dir: Path, cells: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "kd", "compare", *TINY, *cells, "--cache_dir", str(cache_dir)]
    command += ["--storage", f"sqlite:///{root / 'optuna.db'}", "--experiment_name", "compare-test"]
    env = child_env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def runs(root: Path, filter_string: str) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()], filter_string, max_results=1000)


def check_every_cell_once(root: Path, cells: set[tuple[str, str, str]], ratios: list[str]) -> mlflow.entities.Run:
    """One comparison run with a FINISHED run for each of ``cells`` (teacher, student, ratio) and no other, each cell's
    student trained once, a teacher per ratio trained once, nothing left RUNNING; returns the comparison run."""
    [comparison] = runs(root, f"tags.`{RunTag.STEP}` = 'compare'")
    cell_runs = runs(root, f"tags.`mlflow.parentRunId` = '{comparison.info.run_id}'")
    keys = Counter(
        tuple(run.data.tags[tag] for tag in (RunTag.CELL_TEACHER, RunTag.CELL_STUDENT, RunTag.CELL_IMBALANCE)) for run in cell_runs
    )
    assert keys == Counter(cells), "one run per cell"
    assert all(run.info.status == "FINISHED" for run in cell_runs)
    assert comparison.data.metrics[Metric.CELLS_TOTAL] == comparison.data.metrics[Metric.CELLS_FINISHED] == len(cells)
    for cell in cell_runs:
        source = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(cell.data.tags[RunTag.CELL_SOURCE_RUN_ID])
        assert cell.data.metrics[Metric.F1_MEAN] == source.data.metrics[Metric.F1_MEAN]
        assert {Metric.minority_fold_f1(1), Metric.minority_fold_recall(1), Metric.F1_MINORITY_MEAN} <= set(cell.data.metrics)
        assert source.data.params["imbalance"] == cell.data.tags[RunTag.CELL_IMBALANCE]
    trained = Counter(
        run.data.tags[RunTag.PARAMS]
        for run in runs(root, f"tags.`{RunTag.STEP}` = 'distill' and tags.`{RunTag.OUTCOME}` = 'trained'")
        if run.info.status == "FINISHED"
    )
    assert len(trained) == len(cells) and set(trained.values()) == {1}, "every cell's student trained once"
    teachers = [run for run in runs(root, f"tags.`{RunTag.STEP}` = 'teacher'") if run.info.status == "FINISHED"]
    assert sorted(run.data.params["imbalance"] for run in teachers) == ratios, "one teacher per ratio, shared by its students"
    assert not runs(root, "attributes.status = 'RUNNING'")
    return comparison


def test_imbalance_subsamples_the_minority_in_the_training_folds_only(cache_dir: Path) -> None:
    cfg = Config(synthetic_images=60, image_size=32, folds=2, cache_dir=str(cache_dir))
    base = prepare_data(cfg)
    labels = base.dataset.labels
    minority = base.dataset.class_names.index(base.minority)
    assert np.bincount(labels[base.splits.train]).argmin() == minority, "the minority is the class with the fewest training images"
    for ratio in ("2", "3.5"):
        subsampled = prepare_data(cfg.replace(imbalance=ratio))
        # What is validated on and held out: the same rows, so every ratio's cells are scored on the same images.
        assert subsampled.splits.table(subsampled.dataset).equals(base.splits.table(base.dataset))
        assert np.array_equal(subsampled.splits.test, base.splits.test)
        for (train, val), (all_train, all_val) in zip(subsampled.splits.folds, base.splits.folds):
            assert np.array_equal(val, all_val)
            assert np.isin(train, all_train).all()
            assert np.array_equal(train[labels[train] != minority], all_train[labels[all_train] != minority]), "other classes kept"
            majority = np.bincount(labels[all_train]).max()
            assert np.sum(labels[train] == minority) == min(math.ceil(majority / float(ratio)), np.sum(labels[all_train] == minority))
        assert np.isin(subsampled.splits.train, base.splits.train).all() and len(subsampled.splits.train) < len(base.splits.train)
        derived = imbalanced(base, cfg.replace(imbalance=ratio))  # what kd compare does: the data prepared once
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(derived.splits.folds, subsampled.splits.folds))


def test_imbalance_settings_that_cannot_work_are_refused_naming_the_fix(cache_dir: Path) -> None:
    with pytest.raises(PipelineError, match=r"^imbalance='0,0\.5': '0\.5' is not a ratio"):
        Config(imbalance="0,0.5")
    with pytest.raises(PipelineError, match=r"^teachers='resnet:S,resnet:X'"):
        Config(teachers="resnet:S,resnet:X")
    with pytest.raises(PipelineError, match=r"^students='tiny,,small': an empty entry"):
        Config(students="tiny,,small")
    with pytest.raises(PipelineError, match=r"^imbalance='0,4': a step trains on one ratio.*kd compare"):
        prepare_data(Config(imbalance="0,4", cache_dir=str(cache_dir)))
    refused = subprocess.run(
        [sys.executable, "-m", "kd", "distill", "--imbalance", "0,4"], env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and refused.stderr.startswith("error: imbalance='0,4': a step trains on one ratio"), refused.stderr
    cfg = Config(synthetic_images=60, synthetic_classes=3, image_size=32, folds=2, cache_dir=str(cache_dir))
    with pytest.raises(PipelineError, match=r"^minority_class='tumor': not a class of the data; the classes are glioma, meningioma"):
        prepare_data(cfg.replace(minority_class="tumor"))
    chosen = prepare_data(cfg.replace(minority_class="meningioma", imbalance="4"))
    assert chosen.minority == "meningioma", "any class of a multi-class set can be the minority"


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_cell_lock_held_elsewhere_is_skipped_without_waiting_and_taken_once_released(backend: str, tmp_path: Path, request) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_uri")
    with database_lock(url, "compare:cell") as first:
        # another open file (SQLite) or another session (PostgreSQL): what a second worker has
        with database_lock(url, "compare:cell", blocking=False) as second, database_lock(url, "compare:other", blocking=False) as other:
            assert first and not second and other
    with database_lock(url, "compare:cell", blocking=False) as again:
        assert again


def test_workers_train_different_teachers_at_once_but_never_one_teacher_twice(tmp_path: Path) -> None:
    cfg = Config(storage=f"sqlite:///{tmp_path / 'optuna.db'}", teacher_arch="resnet:S")
    entered = {name: threading.Event() for name in ("other teacher", "other ratio", "same teacher", "ensemble with it")}
    others = {
        "other teacher": cfg.replace(teacher_arch="hybrid:S"),
        "other ratio": cfg.replace(imbalance="4"),
        "same teacher": cfg,
        "ensemble with it": cfg.replace(teacher_arch="hybrid:S,resnet:S"),
    }

    def worker(name: str) -> None:
        with teacher_lock(others[name]):
            entered[name].set()

    with teacher_lock(cfg):
        threads = {name: threading.Thread(target=worker, args=(name,)) for name in others}
        threads["ensemble with it"].start()  # first, so it would hold its other member's lock were it to wait holding one
        time.sleep(1)
        for name in ("other teacher", "other ratio", "same teacher"):
            threads[name].start()
        assert entered["other teacher"].wait(10) and entered["other ratio"].wait(10)
        time.sleep(1)
        assert not entered["same teacher"].is_set() and not entered["ensemble with it"].is_set()
    for thread in threads.values():
        thread.join(10)
    assert all(event.is_set() for event in entered.values())


@pytest.mark.slow
def test_a_killed_comparison_resumes_in_its_own_run_and_ends_with_every_cell_once(tmp_path: Path, cache_dir: Path, reliability) -> None:
    victim = start_comparison(tmp_path, cache_dir, RATIOS)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.5)
        try:
            finished = runs(tmp_path, f"tags.`{RunTag.STEP}` = 'cell' and attributes.status = 'FINISHED'")
        except Exception:  # the store is not created yet
            continue
        if finished:
            break
    else:
        victim.kill()
        pytest.fail(f"no cell finished before the comparison ended or timed out: {victim.communicate()[0][-3000:]}")
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    [killed] = runs(tmp_path, f"tags.`{RunTag.STEP}` = 'compare'")
    assert killed.info.status == "RUNNING", "killed with SIGKILL: the run is left for the next start to close"

    output = finish(start_comparison(tmp_path, cache_dir, RATIOS))
    assert f"resuming comparison 'kd-comparison', run {killed.info.run_id}" in output
    comparison = check_every_cell_once(
        tmp_path, {("resnet:S", "2x1", "0"), ("", "2x1", "0"), ("resnet:S", "2x1", "2"), ("", "2x1", "2")}, ["0", "2"]
    )
    assert comparison.info.run_id == killed.info.run_id
    reliability.fault(
        "kill -9 of `kd compare` after its first cell, then a restart", "resumed in the same comparison run; 4 cells, one run each"
    )
    reliability.lost("runs", 0, "killed comparison: every cell exactly once (its run resumed), none trained twice, no run left RUNNING")


@pytest.mark.slow
def test_two_workers_split_the_cells_and_train_none_twice(tmp_path: Path, cache_dir: Path) -> None:
    workers = [start_comparison(tmp_path, cache_dir, STUDENTS) for _ in range(2)]
    outputs = [finish(worker) for worker in workers]
    check_every_cell_once(tmp_path, {("resnet:S", "2x1", "0"), ("resnet:S", "4x1", "0"), ("", "2x1", "0"), ("", "4x1", "0")}, ["0"])
    trained = [sum("done (" in line and "finished before" not in line for line in output.splitlines()) for output in outputs]
    assert sum(trained) == 4 and min(trained) >= 1, f"each worker ran cells of its own: {trained}"
