"""The report's results section as document blocks, one function per part (table, test or figure). Every number comes
from :class:`Sources` or :class:`Findings`."""

from __future__ import annotations

from pathlib import Path

from pipelines.names import VersionTag
from registry.report.comparison import comparison_blocks, plot_comparison
from registry.report.document import Block, Figure, Heading, num, para, table
from registry.report.figures import confusion_figure, curve_figure, gradcam_examples, gradcam_figure, importance_figure
from registry.report.gather import MODELS, ComparisonResults, Sources
from registry.report.methods_data import cross_validation_words
from registry.report.stats import (
    BOOTSTRAP_RESAMPLES,
    METRICS,
    Findings,
    comparison_numbers,
    findings,
    per_class_f1_rows,
    per_class_scores,
    report_numbers,
)
from registry.report.trust import calibration_numbers, calibration_result, card_result


def results(s: Sources, out_dir: Path, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[list[Block], dict]:
    """The results section, its figures written under ``out_dir/figures``, and every number in it (``report.json``)."""
    f = findings(s, resamples)
    figures = out_dir / "figures"
    blocks: list[Block] = [
        Heading(1, "Results"),
        kfold_table(s, f),
        holdout_table(f),
        *fold_comparison(s, f),
        per_class_table(s, f),
        per_class_f1_table(s, f),
        *holdout_figures(s, f, figures),
        *calibration_result(s, out_dir),
        importance_result(f, figures),
        gradcam_result(s, f, figures),
        *comparison_result(s.comparison, out_dir),
        card_result(s, out_dir),
    ]
    numbers = report_numbers(s, f) | {"calibration": calibration_numbers(s)}
    if s.comparison is not None:
        numbers["comparison"] = comparison_numbers(s.comparison)
    return blocks, numbers


def holdout_description(f: Findings) -> str:
    """The hold-out split in words: its size and images per class."""
    return f"{len(f.labels)} hold-out images ({', '.join(f'{n} {name}' for name, n in f.class_counts.items())})"


def kfold_table(s: Sources, f: Findings) -> Block:
    """Cross-validation metrics of the three models: mean ± standard deviation over the folds."""
    words = cross_validation_words(s.data_cfg)
    return table(
        "kfold",
        f"{words[0].upper()}{words[1:]}: mean ± standard deviation over the validation folds "
        f"({'teacher run' if not s.ensemble else 'the ensemble teacher: its mean logits on each fold'}, "
        f"best search trial {s.version.tags.get(VersionTag.TRIAL)}, no-KD run of the same student configuration).",
        ["metric"] + list(MODELS.values()),
        [[label] + [f"{num(f.kfold[who][m]['mean'])} ± {num(f.kfold[who][m]['std'])}" for who in MODELS] for m, label in METRICS.items()],
    )


def holdout_table(f: Findings) -> Block:
    """Hold-out metrics of the three models with their bootstrap intervals."""
    return table(
        "holdout",
        f"Hold-out test split ({holdout_description(f)}): value [95% bootstrap confidence interval, {f.resamples} resamples]. "
        "Teacher and students were retrained on the whole training part.",
        ["metric"] + list(MODELS.values()),
        [
            [label] + [f"{num(f.holdout[who][m])} [{num(f.intervals[who][m][0])}, {num(f.intervals[who][m][1])}]" for who in MODELS]
            for m, label in METRICS.items()
        ],
    )


def fold_comparison(s: Sources, f: Findings) -> list[Block]:
    """F1 per fold of the three models, and the paired KD vs no-KD tests on those folds."""
    cfg, per_fold, test = s.data_cfg, f.fold_f1, f.paired_test
    n = test["n"]
    # With n pairs the smallest two-sided Wilcoxon p-value is 2 / 2^n: say so when it cannot reach 0.05.
    floor = (
        f" With {n} pairs the smallest attainable two-sided Wilcoxon p-value is {num(2 / 2**n)}, "
        "so that test cannot reach significance at 0.05."
        if 2 / 2**n >= 0.05
        else ""
    )
    numbering = f"k = repeat × {cfg.folds} + fold, " if cfg.repeats > 1 else ""
    return [
        table(
            "folds",
            f"F1 per validation fold (numbered 0 to {cfg.fold_count - 1}, {numbering}as in the logs and the runs' f1_fold_<k> metrics); "
            "the KD and no-KD students share folds and initialisation seeds.",
            ["fold"] + list(MODELS.values()) + ["KD − no-KD"],
            [
                [str(k)] + [num(per_fold[who][k]) for who in MODELS] + [num(per_fold["student"][k] - per_fold["no_kd"][k])]
                for k in range(cfg.fold_count)
            ],
        ),
        para(
            f"KD vs no-KD over n = {n} paired fold scores"
            + (f" ({cfg.repeats} repeats × {cfg.folds} folds)" if cfg.repeats > 1 else "")
            + f": mean F1 difference {num(test['mean_difference'])}; "
            f"corrected resampled t-test t = {num(test['t'])}, df = {test['df']}, p = {num(test['t_pvalue'])}; "
            f"secondary: Wilcoxon signed-rank W = {num(test['wilcoxon'])}, p = {num(test['wilcoxon_pvalue'])}." + floor
        ),
    ]


def per_class_table(s: Sources, f: Findings) -> Block:
    """Per-class hold-out precision, recall and F1 of the KD student."""
    scores = per_class_scores(f.labels, f.probs["student"], len(s.class_names))
    rows = [
        [name, num(scores["precision"][i]), num(scores["recall"][i]), num(scores["f1"][i]), str(int(scores["support"][i]))]
        for i, name in enumerate(s.class_names)
    ]
    return table("per-class", "Per-class hold-out metrics of the KD student.", ["class", "precision", "recall", "F1", "images"], rows)


def per_class_f1_table(s: Sources, f: Findings) -> Block:
    """Per-class and macro F1 of the three models as their runs logged them: k-fold mean / hold-out."""
    numbers = f.per_class_f1
    rows = [
        [label] + [f"{num(numbers[who]['kfold_mean'][key])} / {num(numbers[who]['holdout'][key])}" for who in MODELS]
        for label, key in per_class_f1_rows(s.class_names)
    ]
    return table(
        "per-class-f1",
        "F1 per class and macro-F1 (unweighted mean over the classes): k-fold mean / hold-out, as logged by the runs.",
        ["class"] + list(MODELS.values()),
        rows,
    )


def holdout_figures(s: Sources, f: Findings, figures: Path) -> list[Block]:
    """Confusion matrices, ROC and precision-recall curves of the three models on the hold-out split."""
    averaged = "" if len(s.class_names) == 2 else " (micro-averaged one-vs-rest)"
    return [
        Figure(
            "confusion",
            confusion_figure(f.labels, f.probs, s.class_names, figures / "confusion-matrices.png"),
            f"Confusion matrices on the {holdout_description(f)}, arg-max decisions; rows are true classes.",
        ),
        Figure(
            "roc",
            curve_figure("roc", f.labels, f.probs, f.holdout, figures / "roc-curves.png"),
            f"ROC curves on the hold-out split{averaged}; the legend gives the logged ROC-AUC.",
        ),
        Figure(
            "pr",
            curve_figure("pr", f.labels, f.probs, f.holdout, figures / "pr-curves.png"),
            f"Precision-recall curves on the hold-out split{averaged}; the legend gives the logged PR-AUC.",
        ),
    ]


def importance_result(f: Findings, figures: Path) -> Block:
    """The search parameters' importances as a figure, or why they were not computed."""
    if not f.importances:
        return para(f"Search parameter importances: {f.importance_note}.")
    return Figure(
        "importance",
        importance_figure(f.importances, figures / "param-importances.png"),
        f"Importance of each searched hyper-parameter for the objective ({f.importance_note}): "
        + ", ".join(f"{name} {num(value)}" for name, value in f.importances.items())
        + ".",
    )


def gradcam_result(s: Sources, f: Findings, figures: Path) -> Block:
    """Grad-CAM of the KD student and the teacher on one hold-out scan per outcome, or why there is none."""
    examples = gradcam_examples(s, f.labels, f.probs["student"])
    if not examples:
        return para("Grad-CAM examples: the hold-out files are no longer at their recorded paths.")
    return Figure(
        "gradcam",
        gradcam_figure(s, examples, figures / "gradcam-holdout.png"),
        "Grad-CAM of the KD student and the teacher on hold-out scans, one per outcome of the KD student ("
        + ", ".join(o for o, _ in examples)
        + "); the map explains each model's predicted class and is drawn over the scan, "
        "except where it is zero everywhere (the panel title says so).",
    )


def comparison_result(comparison: ComparisonResults | None, out_dir: Path) -> list[Block]:
    """Section "Comparison": the KD comparison's tables and figures (``registry.report.comparison``), when the report has one."""
    if comparison is None:
        return []
    return comparison_blocks(comparison, plot_comparison(comparison, out_dir / "figures", base=out_dir, prefix="comparison-"))
