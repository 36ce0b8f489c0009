"""The evidence's numbers and documents (``kd evidence``), read back from the tracking store; nothing here trains.

:func:`evidence_results` gathers, from a finished comparison run and a main run, every number ``results.json`` holds:
the teacher's k-fold macro-F1 (mean, sd, per class), each KD cell against its no-KD twin (the comparison's own
statistics, :func:`registry.report.comparison.kd_table`: the corrected resampled t-test and Holm's adjustment), the
promoted student's hold-out macro-F1, per-class F1 and confusion matrix, and the main run's wall times.
:func:`write_evidence` writes them as ``results.json``, ``evidence.md`` and ``evidence.tex`` with the figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

from pipelines.evaluation.metrics import CONFUSION_ARTIFACT, pyplot, save_figure
from pipelines.names import Metric, RunTag
from pipelines.training.fit import describe_optimiser
from registry.report.comparison import comparison_blocks, mean_std, plot_comparison, ratio_label
from registry.report.document import Block, Code, Figure, Heading, bullets, num, para, table, to_latex, to_markdown
from registry.report.gather import comparison_results, run_config
from registry.report.methods_data import augmentation_description
from registry.report.stats import kd_table, per_class_f1_rows
from search.compare import clock

MAIN_STEPS = ("prepare", "teacher", "search", "promote")
HOLDOUT_MODELS = {"student": "promoted KD student", "no_kd": "its no-KD twin", "teacher": "teacher (all training data)"}
# Issue 23's aims, each checked against the numbers (the document says which are met).
AIM_TEACHER_F1, AIM_KD_GAIN, AIM_P, AIM_GAP = 0.95, 0.02, 0.05, 0.03
CONFUSION_FIGURE = "holdout-confusion-matrix.png"


def finite(value: float) -> float | None:
    """A float for JSON (NaN, which JSON lacks, as null)."""
    value = float(value)
    return value if math.isfinite(value) else None


def ratio_number(ratio: str) -> int | float:
    value = float(ratio)
    return int(value) if value.is_integer() else value


def evidence_results(comparison_id: str, main_id: str) -> dict:
    """Every number of the evidence, with the runs it comes from (see the module's docstring)."""
    client = MlflowClient()
    comparison = comparison_results(comparison_id)
    cells = {cell.run.info.run_id: cell for cell in comparison.cells}
    rows = kd_table(comparison).to_dict("records")
    as_is = next(row for row in rows if float(row["ratio"]) == 0)
    teacher = comparison.teachers[cells[as_is["run_id"]].teacher_run_ids[0]]
    teacher_metrics = teacher.data.metrics
    teacher_params = int(teacher_metrics[Metric.TEACHER_PARAMS])
    class_rows = per_class_f1_rows(comparison.class_names)

    evidence_cells = []
    for row in rows:
        kd_cell, twin = cells[row["run_id"]], cells[row["no_kd_run_id"]]
        evidence_cells.append(
            {
                "teacher": row["teacher"],
                "student": row["student"],
                "student_params": int(row["student_params"]),
                "teacher_over_student": teacher_params / row["student_params"],
                "imbalance": ratio_number(row["ratio"]),
                "kd_f1_macro_mean": finite(kd_cell.metrics["f1_macro_mean"]),
                "kd_f1_macro_std": finite(kd_cell.metrics["f1_macro_std"]),
                "nokd_f1_macro_mean": finite(twin.metrics["f1_macro_mean"]),
                "nokd_f1_macro_std": finite(twin.metrics["f1_macro_std"]),
                "delta": finite(row["delta_f1"]),
                "p_corrected": finite(row["p_f1"]),
                "p_holm": finite(row["p_f1_holm"]),
                "kd_f1_minority_mean": finite(row["f1_minority_mean"]),
                "nokd_f1_minority_mean": finite(row["no_kd_f1_minority_mean"]),
                "delta_minority": finite(row["delta_f1_minority"]),
                "p_minority_corrected": finite(row["p_f1_minority"]),
                "p_minority_holm": finite(row["p_f1_minority_holm"]),
                "kd_recall_minority_mean": finite(row["recall_minority_mean"]),
                "nokd_recall_minority_mean": finite(row["no_kd_recall_minority_mean"]),
                "n_pairs": comparison.fold_count,
                "kd_run_id": row["run_id"],
                "nokd_run_id": row["no_kd_run_id"],
            }
        )

    main = client.get_run(main_id)
    promote = client.get_run(main.data.tags[RunTag.step_run_id("promote")])
    held = promote.data.metrics
    confusion = mlflow.artifacts.load_dict(f"runs:/{promote.info.run_id}/{CONFUSION_ARTIFACT}")
    steps = {step: main.data.tags.get(RunTag.step_run_id(step), "") for step in MAIN_STEPS}
    return {
        "teacher": as_is["teacher"],
        "teacher_run_id": teacher.info.run_id,
        "teacher_params": teacher_params,
        "teacher_f1_macro_mean": finite(teacher_metrics["f1_macro_mean"]),
        "teacher_f1_macro_std": finite(teacher_metrics["f1_macro_std"]),
        "teacher_f1_per_class": {
            name: {"mean": finite(teacher_metrics.get(f"{key}_mean", math.nan)), "std": finite(teacher_metrics.get(f"{key}_std", math.nan))}
            for name, key in class_rows[:-1]
        },
        "classes": comparison.class_names,
        "minority_class": comparison.minority_class,
        "folds": comparison.folds,
        "repeats": comparison.fold_count // comparison.folds,
        "settings": {name: value for name, value in comparison.run.data.params.items() if name != "data_dir"},
        "comparison_name": comparison.name,
        "comparison_run_id": comparison_id,
        "cells": evidence_cells,
        "holdout_f1_macro": finite(held["holdout_student_f1_macro"]),
        "holdout": {who: {name: finite(held.get(f"holdout_{who}_{key}", math.nan)) for name, key in class_rows} for who in HOLDOUT_MODELS},
        "holdout_size": int(held.get("holdout_size", 0)),
        "holdout_confusion": {"classes": confusion["class_names"], "rows": "true", "matrix": confusion["matrices"]["holdout_student"]},
        "promoted": {
            "version": promote.data.tags.get(RunTag.REGISTERED_VERSION, ""),
            "promoted": promote.data.tags.get(RunTag.PROMOTED, ""),
            "gate": promote.data.tags.get(RunTag.GATE, ""),
            "trial": promote.data.tags.get(RunTag.TRIAL, ""),
            "student_params": int(held.get(Metric.STUDENT_PARAMS, 0)),
            "kfold_f1_mean": finite(held.get(Metric.KFOLD_F1_MEAN, math.nan)),
            "promote_run_id": promote.info.run_id,
        },
        "main_run_id": main_id,
        "main_wall_s": main.data.metrics[Metric.wall_s("main")],
        "main_step_wall_s": {step: main.data.metrics.get(Metric.wall_s(step)) for step in MAIN_STEPS},
        # a step found finished before this main run took only the time to find it: say which
        "main_steps": {
            step: "ran" if run_id and client.get_run(run_id).data.tags.get("mlflow.parentRunId") == main_id else "reused"
            for step, run_id in steps.items()
        },
    }


def aims(results: dict) -> list[dict]:
    """Issue 23's aims, each with the value reached and whether it is met."""
    best = max(
        (cell for cell in results["cells"] if cell["imbalance"] == 0),
        key=lambda cell: (cell["p_corrected"] is not None and cell["p_corrected"] < AIM_P, cell["delta"] or -math.inf),
    )
    holdout_teacher = results["holdout"]["teacher"]["macro"]
    gap = None if holdout_teacher is None or results["holdout_f1_macro"] is None else holdout_teacher - results["holdout_f1_macro"]
    return [
        {
            "aim": f"teacher k-fold macro-F1 >= {AIM_TEACHER_F1}",
            "value": results["teacher_f1_macro_mean"],
            "met": (results["teacher_f1_macro_mean"] or 0) >= AIM_TEACHER_F1,
        },
        {
            "aim": f"a student >= 20x smaller with KD beating its no-KD twin by >= {AIM_KD_GAIN} macro-F1, corrected p < {AIM_P} "
            f"(best: {best['student']})",
            "value": best["delta"],
            "met": (best["delta"] or -1) >= AIM_KD_GAIN and best["p_corrected"] is not None and best["p_corrected"] < AIM_P,
        },
        {
            "aim": f"the promoted student within {AIM_GAP} hold-out macro-F1 of the teacher",
            "value": gap,
            "met": gap is not None and gap <= AIM_GAP,
        },
    ]


def cell_rows(results: dict) -> list[list[str]]:
    return [
        [
            cell["student"],
            f"{cell['student_params']:,}",
            f"{cell['teacher_over_student']:.0f}x",
            ratio_label(str(cell["imbalance"])),
            f"{num(cell['kd_f1_macro_mean'])} ± {num(cell['kd_f1_macro_std'])}",
            f"{num(cell['nokd_f1_macro_mean'])} ± {num(cell['nokd_f1_macro_std'])}",
            num(cell["delta"]),
            num(cell["p_corrected"]),
            num(cell["p_holm"]),
            num(cell["kd_f1_minority_mean"]),
            num(cell["nokd_f1_minority_mean"]),
            num(cell["kd_recall_minority_mean"]),
            num(cell["nokd_recall_minority_mean"]),
            str(cell["n_pairs"]),
        ]
        for cell in results["cells"]
    ]


def confusion_plot(results: dict, path: Path) -> Figure:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ConfusionMatrixDisplay(confusion_matrix=np.array(results["holdout_confusion"]["matrix"]), display_labels=results["classes"]).plot(
        ax=ax, colorbar=False
    )
    ax.set_title("promoted student, hold-out")
    save_figure(fig, path, dpi=130)
    return Figure(
        "evidence-confusion", path.name, "Confusion matrix of the promoted student on the hold-out (rows: true class, columns: predicted)."
    )


def evidence_blocks(results: dict, comparison_figures: list[Figure], confusion: Figure) -> list[Block]:
    """The evidence as document blocks."""
    comparison = comparison_results(results["comparison_run_id"])
    cfg = run_config(comparison.run)
    classes = results["classes"]
    walls = results["main_step_wall_s"]
    matrix = results["holdout_confusion"]["matrix"]
    return [
        Heading(1, f"Evidence: {results['comparison_name']}"),
        para(
            f"Data {results['data']} (digest {results['data_digest'][:16]}), classes {', '.join(classes)}, minority class "
            f"{results['minority_class']}; {results['folds']} folds × {results['repeats']} repeats of stratified group k-fold on the "
            f"training part; a hold-out of {results['holdout_size']} scans that only promotion reads. Generated from the tracking "
            "store by ",
            Code(results["command"]),
            f" (recipe {results['recipe'] or 'none'}, code {results['code_commit']}) in {clock(results['wall_s'])}.",
        ),
        para(
            f"Training (from the comparison's logged Config): teacher {results['teacher']} ({results['teacher_params']:,} parameters) at "
            f"{cfg.teacher_size} px, students at {cfg.image_size} px; {describe_optimiser(cfg)}; up to {cfg.epochs} epochs with early "
            f"stopping (patience {cfg.patience}) on the validation loss; augmentation: {augmentation_description(cfg)}; KD temperature "
            f"{cfg.temperature:g}, alpha {cfg.alpha:g}."
        ),
        table(
            "evidence-teacher",
            "The teacher's k-fold F1 on the data as it is (mean ± standard deviation over the fold entries), macro and per class.",
            ["macro F1", *classes],
            [
                [
                    mean_std(results["teacher_f1_macro_mean"], results["teacher_f1_macro_std"]),
                    *(
                        mean_std(results["teacher_f1_per_class"][name]["mean"], results["teacher_f1_per_class"][name]["std"])
                        for name in classes
                    ),
                ]
            ],
        ),
        table(
            "evidence-cells",
            "Each student distilled from the teacher (KD) against its no-KD twin: k-fold macro-F1, the mean paired difference (Δ), "
            "the corrected resampled t-test's p and Holm's adjustment across the cells, minority-class F1 and recall, over n paired "
            "fold entries.",
            ["student", "parameters", "teacher / student", "ratio", "KD macro F1", "no-KD macro F1", "Δ", "p", "p Holm"]
            + ["KD minority F1", "no-KD minority F1", "KD minority recall", "no-KD minority recall", "n"],
            cell_rows(results),
        ),
        *comparison_blocks(comparison, comparison_figures, level=2),
        Heading(2, "The promoted student on the hold-out"),
        para(
            f"Main run {results['main_run_id']}: trial {results['promoted']['trial']} of its search, "
            f"{results['promoted']['student_params']:,} parameters, registered as version {results['promoted']['version']} "
            f"(promoted: {results['promoted']['promoted'] or 'n/a'}); hold-out of {results['holdout_size']} scans."
        ),
        table(
            "evidence-holdout",
            "Hold-out F1, macro and per class, of the promoted student, its no-KD twin and the teacher.",
            ["model", "macro F1", *classes],
            [
                [label, num(results["holdout"][who]["macro"]), *(num(results["holdout"][who][name]) for name in classes)]
                for who, label in HOLDOUT_MODELS.items()
            ],
        ),
        table(
            "evidence-confusion-table",
            "The promoted student's hold-out confusion matrix: rows the true class, columns the predicted one.",
            ["true \\ predicted", *classes],
            [[name, *(str(count) for count in row)] for name, row in zip(classes, matrix)],
        ),
        confusion,
        Heading(2, "Wall time"),
        table(
            "evidence-wall",
            "Wall time of each step of the main run (h:mm:ss; a step reused from an earlier run took the time to find it).",
            ["step", "wall time", "ran or reused"],
            [[step, clock(walls[step]), results["main_steps"][step]] for step in MAIN_STEPS]
            + [["main (all)", clock(results["main_wall_s"]), ""], ["this evidence command", clock(results["wall_s"]), ""]],
        ),
        Heading(2, "Aims"),
        bullets(*(f"{aim['aim']}: {num(aim['value'])}, {'met' if aim['met'] else 'not met'}" for aim in results["aims"])),
    ]


def write_evidence(results: dict, folder: Path) -> list[Path]:
    """``results.json``, ``evidence.md``, ``evidence.tex`` and the figures into ``folder``; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    results["aims"] = aims(results)
    comparison = comparison_results(results["comparison_run_id"])
    figures = plot_comparison(comparison, folder)
    confusion = confusion_plot(results, folder / CONFUSION_FIGURE)
    blocks = evidence_blocks(results, figures, confusion)
    paths = {name: folder / name for name in ("results.json", "evidence.md", "evidence.tex")}
    paths["results.json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["evidence.md"].write_text(to_markdown(blocks))
    paths["evidence.tex"].write_text(to_latex(blocks))
    return [*paths.values(), *(folder / figure.path for figure in figures), folder / confusion.path]
