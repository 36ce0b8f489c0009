"""Entry point ``evidence`` (issue 23): one command that produces, from the tracking store, the evidence that
distillation earns its place on a data set.

1. ``main`` on the data as it is (prepare -> teacher -> search -> promote) runs first, so its wall time
   (``main_wall_s`` and each step's ``<step>_wall_s``) counts the teacher's training. A finished main run of this
   evidence (tag ``kd.evidence``) with the same data, parameters and code is reused instead: its wall times stay those
   of the run that did the work. Its search's student budget is the teacher's parameters / 20 unless ``max_params`` says.
2. The comparison (:func:`search.compare.run_comparison`): the teacher x every student x KD/no-KD x every imbalance
   ratio over folds x repeats paired fold entries; resumed where it stopped, finished cells kept.
3. The documents, read back from the store (:mod:`kd.evidence_report`): ``results.json``, ``evidence.md`` and
   ``evidence.tex`` with their figures in ``out_dir`` (default ``docs/<comparison_name>``), also logged to an
   ``evidence`` run with the command's wall time (``wall_s``).

Every trained result is reused by its step's own key, so running the command again only reads the store again.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import mlflow
import numpy as np

from benchmarks.common import SIZE_RATIO, student_budget
from kd.evidence_report import evidence_results, write_evidence
from kd.main import run_main
from pipelines.config import PROJECT_ROOT, SEARCH_PARAMS, Config, PipelineError, parse_list
from pipelines.fingerprint import code_fingerprint
from pipelines.log import logger
from pipelines.names import Metric, RunTag
from pipelines.recipes import check_evidence
from pipelines.steps.prepare import Prepared, prepare_data
from pipelines.tracking.runs import close_stale_runs, newest_matching_run, step_key, tracked_run
from registry.evidence import code_version
from registry.report.comparison import write_tables_when_complete
from registry.report.document import data_label
from search.compare import clock, run_comparison
from search.objective import student_cost

# What decides a main run's result beyond the search's key: the promotion's settings.
MAIN_PARAMS = tuple(dict.fromkeys((*SEARCH_PARAMS, "qat", "model_name", "margin", "force", "serving_format")))


def check_sizes(cfg: Config, num_classes: int) -> tuple[int, dict[str, int]]:
    """The teacher's budget for a student (its parameters / 20, :func:`benchmarks.common.student_budget`) and each
    student's parameters; a student over the budget is refused before anything trains."""
    budget = student_budget(cfg, num_classes)
    image = np.zeros((1, cfg.image_size, cfg.image_size, 1), np.float32)
    sizes = {
        student: int(student_cost(cfg.replace(student_size=student), num_classes, image)[Metric.STUDENT_PARAMS])
        for student in parse_list("students", cfg.students)
    }
    over = {student: params for student, params in sizes.items() if params > budget}
    if over:
        listed = ", ".join(f"{student} ({params:,} parameters)" for student, params in over.items())
        raise PipelineError(
            f"students={cfg.students!r}: {listed} not {SIZE_RATIO}x smaller than the teacher {cfg.teacher_arch} at "
            f"{cfg.teacher_size} px (at most {budget:,} parameters); choose smaller students or a larger teacher"
        )
    return budget, sizes


def main_config(cfg: Config, budget: int, main_folds: int = 0, main_repeats: int = 0) -> Config:
    """The ``main`` run's Config: the data as it is, its own folds and repeats (0: the comparison's), and the student
    budget ``budget`` unless ``max_params`` is given."""
    return cfg.replace(
        imbalance="0",
        folds=main_folds or cfg.folds,
        repeats=main_repeats or cfg.repeats,
        max_params=cfg.max_params or budget,
        fold=-1,
    )


def shown_argument(token: str) -> str:
    """A command-line token as documents show it: absolute paths (also after ``--x=`` or ``sqlite:///``) named as
    :func:`registry.report.document.data_label` names them."""
    flag, equals, value = token.partition("=") if token.startswith("--") else ("", "", token)
    scheme = "sqlite:///" if value.startswith("sqlite:///") else ""
    path = value.removeprefix(scheme)
    if os.path.isabs(path):
        value = scheme + data_label(path)
    return f"{flag}{equals}{value}"


def command_text(name: str, argv: list[str]) -> str:
    """``kd <name> ...`` as it was given, no path of this machine in it."""
    return shlex.join(["kd", name, *(shown_argument(token) for token in argv)])


def reused_main(cfg: Config, digest: str) -> str | None:
    """A finished main run of this evidence on the same data, parameters and code, or None."""
    found = newest_matching_run(
        "main",
        digest,
        step_key(cfg, MAIN_PARAMS),
        code_fingerprint("main"),
        f"tags.`{RunTag.EVIDENCE}` = '{cfg.comparison_name}' and attributes.status = 'FINISHED'",
    )
    if found is None or Metric.wall_s("main") not in found.data.metrics:
        return None
    walls = found.data.metrics
    logger("evidence").info(
        f"reusing main run {found.info.run_id} (same data, parameters and code; it took {clock(walls[Metric.wall_s('main')])})"
    )
    return found.info.run_id


def run_main_once(cfg: Config, prepared: Prepared) -> str:
    """The main run of this evidence: a finished one reused, else run now (tagged so a rerun finds it); returns its id."""
    previous = reused_main(cfg, prepared.dataset.digest)
    if previous is not None:
        return previous
    tags = {RunTag.EVIDENCE: cfg.comparison_name, RunTag.PARAMS: step_key(cfg, MAIN_PARAMS)}
    return run_main(cfg, tags=tags, prepared=prepared)["main"]


def run_evidence(
    cfg: Config,
    out_dir: str = "",
    main_folds: int = 0,
    main_repeats: int = 0,
    recipe: str = "",
    argv=(),
    launched_run_id: str | None = None,
) -> Path:
    """Run (or reuse) the main run and the comparison, then write the evidence into ``out_dir`` (empty:
    ``docs/<comparison_name>``); returns the path of ``results.json``. ``recipe`` and ``argv`` are recorded as given;
    ``launched_run_id``, the run ``mlflow run . -e evidence`` started, becomes the evidence run (the main run and the
    comparison get runs of their own)."""
    start = time.monotonic()
    check_evidence(cfg)
    base = prepare_data(cfg.replace(imbalance="0"))
    if base.dataset.binary:
        raise PipelineError(
            f"data {data_label(cfg.data_dir)}: two classes; the evidence reports macro-F1 of a multi-class set, where every "
            "F1 the comparison pairs is macro-F1 (use kd compare for two classes)"
        )
    budget, sizes = check_sizes(cfg, base.dataset.num_classes)
    logger("evidence").info(
        f"teacher {cfg.teacher_arch} at {cfg.teacher_size} px; students "
        + ", ".join(f"{student} {params:,}" for student, params in sizes.items())
        + f" parameters (each at most {budget:,}: {SIZE_RATIO}x smaller)"
    )
    main_cfg = main_config(cfg, budget, main_folds, main_repeats)
    main_id = run_main_once(main_cfg, prepare_data(main_cfg, reuse=base))
    comparison_cfg = cfg.replace(teachers=cfg.teacher_arch, fold=-1)
    comparison_id = run_comparison(comparison_cfg, base)
    write_tables_when_complete(comparison_id, comparison_cfg)

    folder = Path(out_dir) if out_dir else PROJECT_ROOT / "docs" / cfg.comparison_name
    mlflow.set_experiment(cfg.experiment_name)
    close_stale_runs()
    # A launched run keeps the name it was given (kd.cli named it after the entry point unless the user named it).
    with tracked_run(cfg, step="evidence", run_id=launched_run_id, run_name=None if launched_run_id else "evidence") as run:
        mlflow.set_tags(
            {
                RunTag.STEP: "evidence",
                RunTag.EVIDENCE: cfg.comparison_name,
                RunTag.DATA_DIGEST: base.dataset.digest,
                RunTag.step_run_id("main"): main_id,
                RunTag.step_run_id("compare"): comparison_id,
            }
        )
        results = evidence_results(comparison_id, main_id)
        wall_s = time.monotonic() - start
        results.update(
            {
                "command": command_text("evidence", list(argv)),
                "recipe": recipe,
                "code_commit": code_version(),
                "data": data_label(cfg.data_dir),
                "data_digest": base.dataset.digest,
                "wall_s": wall_s,
                "evidence_run_id": run.info.run_id,
            }
        )
        mlflow.log_metric(Metric.WALL_S, wall_s)
        written = write_evidence(results, folder)
        for path in written:
            mlflow.log_artifact(str(path), "evidence")
    logger("evidence").info(
        f"wrote {len(written)} files to {data_label(folder)} in {clock(wall_s)} (main {clock(results['main_wall_s'])}); "
        f"run {run.info.run_id}"
    )
    return folder / "results.json"
