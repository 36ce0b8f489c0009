"""Teachers worth distilling from (issue 15): each teacher's k-fold F1, and its KD student against the no-KD twin
with the corrected resampled t-test over repeats x folds, on the real scans; every figure read back from the
tracking store.

    python -m benchmarks.teachers [--epochs N] [--folds K] [--repeats R] [--store DIR]

Each row runs the ``distill`` step (the function behind ``kd distill`` and ``mlflow run . -e distill``) with one
teacher, and the no-KD twin once (its reuse key leaves the teacher out). The store persists (default
``.cache/teachers``), so a rerun or an interrupted run reuses every finished teacher and student. Writes
``benchmarks/results/teachers.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlflow

from benchmarks.common import REAL_DATA_DIR
from pipelines.config import DISTILL_PARAMS, PROJECT_ROOT, Config
from pipelines.evaluation.statistics import corrected_resampled_t_test, kfold_test_train_ratio
from pipelines.names import Metric, RunTag
from pipelines.steps.distill import distill
from pipelines.steps.prepare import prepare_data
from registry.report.document import data_label
from registry.report.stats import fold_f1


def teachers(image_size: int) -> dict[str, dict]:
    """Row name -> the teacher settings of its distill run; the student, KD settings, data and folds are shared.
    The high-resolution teacher sees twice the student's pixels per side (the smaller resnet keeps its cost near the others')."""
    return {
        "resnet": {"teacher_arch": "resnet"},
        "hybrid": {"teacher_arch": "hybrid"},
        f"resnet:S at {2 * image_size} px": {"teacher_arch": "resnet:S", "teacher_image_size": 2 * image_size},
        "ensemble resnet,hybrid": {"teacher_arch": "resnet,hybrid"},
    }


RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def teacher_figures(kd_run: mlflow.entities.Run) -> dict[str, float]:
    """The teacher's k-fold F1 and size: its own run's, or, for an ensemble (no run of its own), the distill run's
    ``teacher_*`` metrics and the members' summed parameters."""
    run_ids = kd_run.data.tags[RunTag.TEACHER_RUN_ID].split(",")
    members = [mlflow.get_run(run_id) for run_id in run_ids]
    params = sum(member.data.metrics[Metric.TEACHER_PARAMS] for member in members)
    if len(members) == 1:
        source = members[0].data.metrics
    else:
        source = {key.removeprefix("teacher_"): value for key, value in kd_run.data.metrics.items() if key.startswith("teacher_")}
    return {"f1_mean": source[Metric.F1_MEAN], "f1_std": source[Metric.F1_STD], "params": params}


def measure(cfg: Config) -> tuple[str, dict[str, str]]:
    """Distil from every teacher, and the twin once; returns the twin's run id and each teacher row's KD run id."""
    prepared = prepare_data(cfg)
    twin = distill(cfg.replace(no_kd=True), prepared)
    return twin, {name: distill(cfg.replace(**changes), prepared) for name, changes in teachers(cfg.image_size).items()}


def rows_from_store(twin_run_id: str, kd_run_ids: dict[str, str], cfg: Config) -> list[dict]:
    """One row per teacher, every figure read back from the tracking store."""
    twin = mlflow.get_run(twin_run_id)
    twin_folds = fold_f1(twin.data.metrics, cfg.fold_count, "no_kd")
    rows = []
    for name, run_id in kd_run_ids.items():
        kd_run = mlflow.get_run(run_id)
        kd_folds = fold_f1(kd_run.data.metrics, cfg.fold_count, "student")
        test = corrected_resampled_t_test(kd_folds, twin_folds, kfold_test_train_ratio(cfg.folds))
        teacher = teacher_figures(kd_run)
        student_params = kd_run.data.metrics[Metric.STUDENT_PARAMS]
        rows.append(
            {
                "teacher": name,
                **{f"teacher_{key}": value for key, value in teacher.items()},
                "teacher_params_over_student": teacher["params"] / student_params,
                "student_params": student_params,
                "kd_f1_mean": kd_run.data.metrics[Metric.F1_MEAN],
                "kd_f1_std": kd_run.data.metrics[Metric.F1_STD],
                "no_kd_f1_mean": twin.data.metrics[Metric.F1_MEAN],
                "no_kd_f1_std": twin.data.metrics[Metric.F1_STD],
                "kd_minus_no_kd": test.mean_difference,
                "t": test.t,
                "p": test.pvalue,
                "paired_scores": test.n,
                "kd_run": run_id,
                "twin_run": twin_run_id,
                "teacher_runs": kd_run.data.tags[RunTag.TEACHER_RUN_ID],
            }
        )
    return rows


def render(rows: list[dict], cfg: Config) -> str:
    """The table as Markdown, with the settings it was measured at."""
    header = (
        f"Data {data_label(cfg.data_dir)}, student `{cfg.student_size}` at {cfg.image_size} px, KD T = "
        f"{cfg.temperature:g}, "
        f"alpha = {cfg.alpha:g}; stratified group {cfg.folds}-fold x {cfg.repeats} repeats (same folds for every row), "
        f"up to {cfg.epochs} epochs (patience {cfg.patience}). KD vs no-KD: corrected resampled t-test (Nadeau-Bengio) "
        "over the paired fold scores.\n\n"
    )
    lines = [
        "| teacher | teacher k-fold F1 | teacher params | / student | KD student F1 | no-KD twin F1 | KD - no-KD | t | p | n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['teacher']} | {r['teacher_f1_mean']:.3f} ± {r['teacher_f1_std']:.3f} | {r['teacher_params']:,.0f} | "
            f"{r['teacher_params_over_student']:.1f}x | {r['kd_f1_mean']:.3f} ± {r['kd_f1_std']:.3f} | "
            f"{r['no_kd_f1_mean']:.3f} ± {r['no_kd_f1_std']:.3f} | {r['kd_minus_no_kd']:+.3f} | {r['t']:.2f} | {r['p']:.3f} | "
            f"{r['paired_scores']} |"
        )
    return header + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(REAL_DATA_DIR), help="empty = the embedded synthetic set")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store", default=str(PROJECT_ROOT / ".cache" / "teachers"), help="tracking store folder (kept: reruns reuse it)")
    parser.add_argument(
        "--render", action="store_true", help="train nothing: read the runs the last measurement recorded (teachers.json) again"
    )
    args = parser.parse_args(argv)
    store = Path(args.store)
    store.mkdir(parents=True, exist_ok=True)
    cfg = Config(
        data_dir=args.data_dir,
        image_size=args.image_size,
        folds=args.folds,
        repeats=args.repeats,
        epochs=args.epochs,
        patience=args.patience,
        temperature=5.0,
        alpha=0.5,
        experiment_name="kd-teachers",
    )
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    mlflow.set_experiment(cfg.experiment_name)
    if args.render:
        recorded = json.loads((RESULTS / "teachers.json").read_text())["rows"]
        twin_run_id, kd_run_ids = recorded[0]["twin_run"], {row["teacher"]: row["kd_run"] for row in recorded}
    else:
        twin_run_id, kd_run_ids = measure(cfg)
    rows = rows_from_store(twin_run_id, kd_run_ids, cfg)
    table = render(rows, cfg)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "teachers.md").write_text(table)
    (RESULTS / "teachers.json").write_text(json.dumps({"settings": cfg.as_params(DISTILL_PARAMS), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
