"""Entry point ``compare``: a full-factorial, resumable comparison of teachers x students x KD/no-KD x imbalance ratios.

Cells: every (teacher, student, ratio) distilled with KD, and every (student, ratio) without (a no-KD student does not
depend on the teacher: one cell serves every teacher). Each cell is one MLflow run nested in the comparison run,
standing for the distill run (trained, or reused when one with the same data, parameters and code finished) whose
metrics it copies; every cell runs on the same folds and seeds. The data is prepared once; each ratio subsamples the
minority class in the training rows of the folds only (:func:`pipelines.steps.prepare.imbalanced`). Cells go ratio by ratio,
teacher by teacher, so a ratio's teacher is trained once (:func:`pipelines.steps.teacher.train_teacher`) and its students
follow.

Resuming: the comparison run is found by its name, data digest, parameters and code, and resumed; cells whose run
finished are skipped, an unfinished cell's run is resumed (never a second run of a cell). Several workers (processes,
machines sharing the stores) split the cells: a worker claims a cell with a non-blocking lock in the study's storage
(:func:`pipelines.tracking.locks.database_lock`), skips cells another holds and waits for those at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow.entities import Run

from pipelines.config import COMPARE_PARAMS, Config, parse_list, parse_ratios
from pipelines.fingerprint import code_fingerprint
from pipelines.log import logger
from pipelines.names import Metric, RunTag
from pipelines.steps.distill import distill
from pipelines.steps.prepare import Prepared, imbalanced, prepare_data
from pipelines.tracking.locks import database_lock
from pipelines.tracking.runs import close_stale_runs, log_data, newest_matching_run, step_key, tracked_run

COMPARE_STEP = "compare"  # kd.step of a comparison run (its reuse key and code fingerprint are this step's)
CELL_STEP = "cell"  # kd.step of a cell run


@dataclass(frozen=True)
class Cell:
    """One cell of the comparison: a student distilled from ``teacher`` at imbalance ``ratio``; no teacher: no KD."""

    teacher: str
    student: str
    ratio: str

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Cell:
        """The cell a run's tags (:attr:`tags`) name."""
        kd = tags[RunTag.CELL_KD] == "true"
        return cls(tags[RunTag.CELL_TEACHER] if kd else "", tags[RunTag.CELL_STUDENT], tags[RunTag.CELL_IMBALANCE])

    @property
    def kd(self) -> bool:
        return bool(self.teacher)

    @property
    def tags(self) -> dict[str, str]:
        return {
            RunTag.CELL_TEACHER: self.teacher,
            RunTag.CELL_STUDENT: self.student,
            RunTag.CELL_KD: str(self.kd).lower(),
            RunTag.CELL_IMBALANCE: self.ratio,
        }

    @property
    def name(self) -> str:
        return f"{self.teacher or 'no-kd'}-{self.student}-imbalance-{self.ratio}"

    def config(self, cfg: Config) -> Config:
        """The distill step's Config of this cell (a no-KD cell keeps the first teacher, which its reuse key ignores)."""
        teacher = self.teacher or parse_list("teachers", cfg.teachers)[0]
        return cfg.replace(teacher_arch=teacher, student_size=self.student, no_kd=not self.teacher, imbalance=self.ratio, fold=-1)


def comparison_cells(cfg: Config) -> list[Cell]:
    """Every cell, ratio by ratio: each teacher's KD students, then the ratio's no-KD students."""
    students = parse_list("students", cfg.students)
    return [
        cell
        for ratio in parse_ratios(cfg.imbalance)
        for cell in [Cell(teacher, student, ratio) for teacher in parse_list("teachers", cfg.teachers) for student in students]
        + [Cell("", student, ratio) for student in students]
    ]


def comparison_run(cfg: Config, prepared: Prepared, launched_run_id: str | None = None) -> tuple[str, bool]:
    """The comparison's run id, and whether it was created now: the newest run of this comparison (name, data digest,
    parameters, code), or a new one (``launched_run_id``, the run ``mlflow run`` started, if any). Called under the
    comparison's creation lock."""
    digest, fingerprint = prepared.dataset.digest, code_fingerprint(COMPARE_STEP)
    key = step_key(cfg, COMPARE_PARAMS)
    client = mlflow.MlflowClient()
    found = newest_matching_run(COMPARE_STEP, digest, key, fingerprint, f"tags.`{RunTag.COMPARISON}` = '{cfg.comparison_name}'")
    if found is not None:
        if launched_run_id:  # `mlflow run` of a resumed comparison: say which run it continued
            client.set_tag(launched_run_id, RunTag.OUTCOME, "reused")
            client.set_tag(launched_run_id, RunTag.REUSED_RUN_ID, found.info.run_id)
        logger("compare").info(f"resuming comparison {cfg.comparison_name!r}, run {found.info.run_id} ({found.info.status})")
        return found.info.run_id, False
    tags = {
        RunTag.STEP: COMPARE_STEP,
        RunTag.COMPARISON: cfg.comparison_name,
        RunTag.DATA_DIGEST: digest,
        RunTag.PARAMS: key,
        RunTag.CODE: fingerprint,
        RunTag.MINORITY_CLASS: prepared.minority,
    }
    if launched_run_id:
        run_id = launched_run_id
        for name, value in tags.items():
            client.set_tag(run_id, name, value)
    else:
        experiment_id = mlflow.set_experiment(cfg.experiment_name).experiment_id
        run_id = client.create_run(experiment_id, run_name=cfg.comparison_name, tags=tags).info.run_id
    already = client.get_run(run_id).data.params  # `mlflow run` logs the MLproject params itself
    for name, value in cfg.as_params(COMPARE_PARAMS + ("data_dir",)).items():
        if name not in already:
            client.log_param(run_id, name, value)
    return run_id, True


def cell_runs(comparison_id: str) -> dict[Cell, Run]:
    """The comparison's cell runs, by cell (any status)."""
    runs = mlflow.search_runs(
        experiment_ids=[mlflow.get_run(comparison_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{comparison_id}' and tags.`{RunTag.STEP}` = '{CELL_STEP}'",
        output_format="list",
    )
    return {Cell.from_tags(run.data.tags): run for run in runs}


def copied_metrics(source: Run) -> dict[str, float]:
    """What a cell holds of its distill run: F1 (mean, spread, per fold, per class), the minority's F1 and recall, size."""
    return {
        name: value for name, value in source.data.metrics.items() if name == Metric.STUDENT_PARAMS or name.startswith(("f1_", "recall_"))
    }


def run_cell(cfg: Config, cell: Cell, prepared: Prepared, comparison_id: str, blocking: bool) -> tuple[Run | None, bool]:
    """Run one cell unless it finished already: its finished run and whether this call ran it; (None, False) when
    another worker holds the cell (``blocking``: wait for that worker instead, then find it finished or run it)."""
    with database_lock(cfg.storage_url, f"compare:{comparison_id}:{cell.name}", blocking=blocking) as held:
        if not held:
            return None, False
        existing = cell_runs(comparison_id).get(cell)
        if existing is not None and existing.info.status == "FINISHED":
            return existing, False
        # A cell whose run a killed or failed worker left is resumed in that run: one run per cell, whatever happened.
        start = {"run_id": existing.info.run_id} if existing is not None else {"run_name": cell.name}
        # The cell's tags come with its new run: a worker killed as it starts leaves a run that is found (and resumed).
        tags = {RunTag.STEP: CELL_STEP, RunTag.COMPARISON: cfg.comparison_name, **cell.tags}
        with tracked_run(cfg, nested=True, tags=tags, **start) as run:
            source = mlflow.get_run(distill(cell.config(cfg), prepared, nested=True))
            lineage = {RunTag.CELL_SOURCE_RUN_ID: source.info.run_id, RunTag.MINORITY_CLASS: prepared.minority}
            if cell.teacher:
                lineage[RunTag.TEACHER_RUN_ID] = source.data.tags[RunTag.TEACHER_RUN_ID]
            mlflow.set_tags(lineage)
            folds = prepared.splits.folds
            test_train = np.mean([len(val) for _, val in folds]) / np.mean([len(train) for train, _ in folds])
            mlflow.log_metrics({**copied_metrics(source), Metric.TEST_TRAIN_RATIO: float(test_train)})
        return mlflow.get_run(run.info.run_id), True


def clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


class Progress:
    """One line per finished cell: cells done of all (by every worker), its F1, time so far and the estimated time left
    (this worker's mean time per trained cell, times the cells left); ``cells_finished`` on the comparison run."""

    def __init__(self, comparison_id: str, total: int):
        self.comparison_id, self.total, self.start, self.trained = comparison_id, total, time.monotonic(), 0

    def done(self, cell: Cell, run: Run, trained: bool) -> None:
        self.trained += trained
        finished = sum(other.info.status == "FINISHED" for other in cell_runs(self.comparison_id).values())
        mlflow.MlflowClient().log_metric(self.comparison_id, Metric.CELLS_FINISHED, finished)
        elapsed = time.monotonic() - self.start
        left = f", about {clock(elapsed / self.trained * (self.total - finished))} left" if self.trained and finished < self.total else ""
        metrics = run.data.metrics
        logger("compare").info(
            f"cell {finished}/{self.total} done ({cell.name}{'' if trained else ', finished before'}): F1 "
            f"{metrics[Metric.F1_MEAN]:.4f} ± {metrics[Metric.F1_STD]:.4f}, minority F1 {metrics[Metric.F1_MINORITY_MEAN]:.4f}; "
            f"elapsed {clock(elapsed)}{left}"
        )


def run_comparison(cfg: Config, prepared: Prepared | None = None, launched_run_id: str | None = None) -> str:
    """Run (or resume, or join) the comparison ``cfg`` describes; returns the comparison run's id.

    ``prepared``: the data as it is (imbalance 0), when a caller has it already; ``launched_run_id``: the run ``mlflow
    run`` started for this worker, which becomes the comparison run, or is tagged with the one it resumed.
    """
    cfg.check_comparison()
    cells = comparison_cells(cfg)
    base = prepare_data(cfg.replace(imbalance="0"), reuse=prepared)
    by_ratio = {ratio: imbalanced(base, cfg.replace(imbalance=ratio)) for ratio in parse_ratios(cfg.imbalance)}
    # Workers starting together: one creates the tracking store's tables and the comparison run, the others find them.
    with database_lock(cfg.storage_url, f"compare:{cfg.comparison_name}:create"):
        if not launched_run_id:  # a launched run is in the experiment `mlflow run` chose
            mlflow.set_experiment(cfg.experiment_name)
        close_stale_runs()
        comparison_id, created = comparison_run(cfg, base, launched_run_id)
    # Cell runs nest in the comparison run, so they belong in its experiment whoever created it.
    mlflow.set_experiment(experiment_id=mlflow.get_run(comparison_id).info.experiment_id)
    logger("compare").info(
        f"{len(cells)} cells ({cfg.teachers} x {cfg.students} x KD/no-KD x imbalance {cfg.imbalance}), minority {base.minority!r}"
    )
    # step=COMPARE_STEP: the run keeps the fingerprint of the comparison's code, by which a rerun finds and resumes it
    with tracked_run(cfg, step=COMPARE_STEP, run_id=comparison_id):
        if created:
            log_data(base.dataset, base.splits)
        mlflow.log_metric(Metric.CELLS_TOTAL, len(cells))
        progress = Progress(comparison_id, len(cells))
        before = sum(run.info.status == "FINISHED" for run in cell_runs(comparison_id).values())
        if before:
            logger("compare").info(f"{before}/{len(cells)} cells finished before{'; running the rest' if before < len(cells) else ''}")
        held_elsewhere = []
        for cell in cells:
            done = cell_runs(comparison_id).get(cell)
            if done is not None and done.info.status == "FINISHED":
                continue
            run, trained = run_cell(cfg, cell, by_ratio[cell.ratio], comparison_id, blocking=False)
            if run is None:
                held_elsewhere.append(cell)
            else:
                progress.done(cell, run, trained)
        for cell in held_elsewhere:  # another worker's cells: wait for each; finished then, or left by a dead worker: run here
            progress.done(cell, *run_cell(cfg, cell, by_ratio[cell.ratio], comparison_id, blocking=True))
        finished = sum(run.info.status == "FINISHED" for run in cell_runs(comparison_id).values())
        mlflow.log_metric(Metric.CELLS_FINISHED, finished)
    logger("compare").info(f"comparison {cfg.comparison_name!r} has {finished}/{len(cells)} cells, run {comparison_id}")
    return comparison_id
