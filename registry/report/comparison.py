"""The results of a KD comparison (``mlflow run . -e compare``): does distillation help the minority class, and how do
teacher and student size matter. Read from the comparison run and its nested cell runs; nothing here trains.

A comparison run has one nested run per cell (tags ``kd.cell_*``, see :class:`pipelines.names.RunTag`): a KD cell per
teacher x student x imbalance ratio, and a no-KD cell per student x ratio that serves every teacher of it. Each holds
the fold scores of the distill run it stands for; a KD cell names the teacher run trained on its ratio's folds. From
them come

- the baseline table: k-fold F1 (mean ± std), macro and per class, of every teacher and no-KD student at each ratio;
- the KD table: per KD cell, F1 and minority-class F1, their difference from the no-KD cell of the same student and
  ratio paired by fold entry k (``f1_fold_<k>``, repeats x folds), the corrected resampled t-test of each difference
  and Holm's correction across the cells, one family for F1 and one for minority F1;
- three figures: F1 against student parameters per teacher, the KD gain against the imbalance ratio, and minority
  recall against it.

:func:`write_comparison_tables` (called by ``kd compare`` once every cell has finished) writes them as Markdown, LaTeX
and PNG and logs them to the comparison run (``comparison/``); the report (``registry.report``) includes the same
blocks. Gathering (:mod:`registry.report.gather`) and the tables' numbers (:mod:`registry.report.stats`) are the
report's own.
"""

from __future__ import annotations

import math
from pathlib import Path

from mlflow import MlflowClient

from pipelines.config import PROJECT_ROOT, Config
from pipelines.evaluation.metrics import class_keys, pyplot, save_figure
from pipelines.log import logger
from pipelines.names import Metric
from registry.report.document import Block, Figure, Heading, num, para, table, to_latex, to_markdown
from registry.report.gather import ComparisonResults, comparison_results
from registry.report.stats import baseline_table, kd_table

ARTIFACT_FOLDER = "comparison"
SIGNIFICANCE = 0.05  # Holm-adjusted p below which a figure marks a KD gain
FIGURES = {
    "f1-params": "f1-vs-student-params.png",
    "kd-gain": "kd-gain-vs-imbalance.png",
    "minority-recall": "minority-recall-vs-imbalance.png",
}


def ratio_label(ratio: str) -> str:
    """An imbalance ratio as tables and figures print it: ``0`` is the data as it is."""
    return "as is" if float(ratio) == 0 else ratio


def mean_std(mean: float, std: float) -> str:
    """``mean ± std`` as the report prints them (``n/a`` for a metric a run lacks)."""
    return f"{num(mean)} ± {num(std)}"


def comparison_blocks(results: ComparisonResults, figures: list[Figure], level: int = 1) -> list[Block]:
    """The comparison as document blocks: a heading, what was compared, the two tables and ``figures``."""
    params, run = results.run.data.params, results.run
    baseline, kd = baseline_table(results), kd_table(results)
    class_headers = [f"F1 {name}" + (" (minority)" if name == results.minority_class else "") for name in results.class_names]
    keys = ["f1", "f1_macro", *(f"f1_{key}" for key in class_keys(results.class_names))]  # class keys may hold "-": not attributes
    baseline_rows = [
        [ratio_label(row["ratio"]), row["model"], row["kind"], num(row["params"], 0)]
        + [mean_std(row[f"{key}_mean"], row[f"{key}_std"]) for key in keys]
        for row in baseline.to_dict("records")
    ]
    kd_rows = [
        [
            row.teacher,
            row.student,
            ratio_label(row.ratio),
            num(row.student_params, 0),
            mean_std(row.f1_mean, row.f1_std),
            num(row.delta_f1),
            num(row.p_f1),
            num(row.p_f1_holm),
            mean_std(row.f1_minority_mean, row.f1_minority_std),
            num(row.delta_f1_minority),
            num(row.p_f1_minority),
            num(row.p_f1_minority_holm),
        ]
        for row in kd.itertuples()
    ]
    folds, fold_count = results.folds, results.fold_count
    repeats = fold_count // folds
    # A comparison writes its tables in its own run, still RUNNING then; only a stopped one's status says something.
    stopped = f", {run.info.status.lower()}" if run.info.status in ("FAILED", "KILLED") else ""
    return [
        Heading(level, "Comparison"),
        para(
            f"Comparison {results.name!r} (run {run.info.run_id}{stopped}): teachers {params.get('teachers', 'n/a')}, "
            f"students {params.get('students', 'n/a')}, imbalance ratios {params.get('imbalance', 'n/a')} (0 = the data as it is), "
            f"minority class {results.minority_class}; temperature {params.get('temperature', 'n/a')}, alpha {params.get('alpha', 'n/a')}, "
            f"{params.get('epochs', 'n/a')} epochs, seed {params.get('seed', 'n/a')}; "
            f"{len(results.cells)} finished cells of {num(run.data.metrics.get(Metric.CELLS_TOTAL, math.nan), 0)}. "
            f"Every model is cross-validated on the same {fold_count} validation folds ({repeats} repeats × {folds} folds) "
            "of its ratio's data; a no-KD student serves every teacher of its student size and ratio."
        ),
        table(
            "comparison-baseline",
            "Baselines: k-fold F1 (mean ± standard deviation over the validation folds) of each teacher and no-KD student, "
            "macro-F1 and each class's F1, per imbalance ratio, as their runs logged them.",
            ["ratio", "model", "kind", "parameters", "F1", "macro F1", *class_headers],
            baseline_rows,
        ),
        table(
            "comparison-kd",
            f"KD against no-KD for each teacher, student and imbalance ratio: k-fold F1 and minority-class ({results.minority_class}) F1 "
            f"(mean ± standard deviation), the mean paired difference KD − no-KD over the {fold_count} fold entries (Δ), "
            "the two-sided p-value of Nadeau and Bengio's corrected resampled t-test of that difference "
            "(with each cell's test/train ratio of rows: fewer training rows where the minority is subsampled) "
            f"and Holm's adjustment across the {len(kd)} KD cells, "
            "F1 and minority F1 each a family.",
            ["teacher", "student", "ratio", "parameters", "F1", "ΔF1", "p", "p Holm", "minority F1", "Δ minority F1", "p", "p Holm"],
            kd_rows,
        ),
        *figures,
    ]


def plot_comparison(results: ComparisonResults, folder: Path, base: Path | None = None, prefix: str = "") -> list[Figure]:
    """Draw the comparison's three figures into ``folder`` (file names :data:`FIGURES`, after ``prefix``); returns them as
    document figures with paths relative to ``base`` (default ``folder``), where the document citing them lies."""
    kd = kd_table(results)
    no_kd = [cell for cell in results.cells if not cell.kd]
    ratios = results.ratios
    plt = pyplot()
    paths = {label: folder / f"{prefix}{name}" for label, name in FIGURES.items()}

    fig, axes = plt.subplots(1, len(ratios), figsize=(4.2 * len(ratios), 3.8), sharey=True, squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        for teacher, rows in kd[kd["ratio"] == ratio].groupby("teacher", sort=True):
            rows = rows.sort_values("student_params")
            ax.errorbar(rows["student_params"], rows["f1_mean"], yerr=rows["f1_std"], marker="o", capsize=3, label=f"KD from {teacher}")
        twins = sorted((c for c in no_kd if c.ratio == ratio), key=lambda c: c.metrics.get(Metric.STUDENT_PARAMS, math.nan))
        ax.errorbar(
            [c.metrics.get(Metric.STUDENT_PARAMS, math.nan) for c in twins],
            [c.metrics.get(Metric.F1_MEAN, math.nan) for c in twins],
            yerr=[c.metrics.get(Metric.F1_STD, math.nan) for c in twins],
            marker="s",
            linestyle="--",
            color="black",
            capsize=3,
            label="no KD",
        )
        ax.set_xscale("log")
        ax.set_xlabel("student parameters (log scale)")
        ax.set_title(f"imbalance {ratio_label(ratio)}")
    axes[0][0].set_ylabel("k-fold F1")
    axes[0][-1].legend(fontsize="small")
    save_figure(fig, paths["f1-params"], dpi=130)

    positions = [float(ratio) for ratio in ratios]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for (teacher, student), rows in kd.groupby(["teacher", "student"], sort=True):
        rows = rows.assign(x=rows["ratio"].astype(float)).sort_values("x")
        (line,) = ax.plot(rows["x"], rows["delta_f1"], marker="o", label=f"{teacher} → {student}")
        significant = rows[rows["p_f1_holm"] < SIGNIFICANCE]
        ax.scatter(significant["x"], significant["delta_f1"], marker="*", s=140, color=line.get_color(), zorder=3)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(positions, [ratio_label(ratio) for ratio in ratios])
    ax.set_xlabel("imbalance ratio")
    ax.set_ylabel("KD gain: F1 of KD − no-KD")
    ax.set_title(f"KD gain (stars: Holm-adjusted p < {SIGNIFICANCE:g})")
    ax.legend(fontsize="small")
    save_figure(fig, paths["kd-gain"], dpi=130)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    # colour: the student; marker: the teacher (squares are the no-KD students)
    colours = {student: f"C{i}" for i, student in enumerate(dict.fromkeys(cell.student for cell in results.cells))}
    markers = {teacher: "o^vDPX<>"[i % 8] for i, teacher in enumerate(sorted(set(kd["teacher"])))}
    for (teacher, student), rows in kd.groupby(["teacher", "student"], sort=True):
        rows = rows.assign(x=rows["ratio"].astype(float)).sort_values("x")
        ax.plot(rows["x"], rows["recall_minority_mean"], marker=markers[teacher], color=colours[student], label=f"KD {teacher} → {student}")
    for student in colours:
        twins = sorted((c for c in no_kd if c.student == student), key=lambda c: float(c.ratio))
        ax.plot(
            [float(c.ratio) for c in twins],
            [c.metrics.get(Metric.RECALL_MINORITY_MEAN, math.nan) for c in twins],
            marker="s",
            linestyle="--",
            color=colours[student],
            label=f"no KD {student}",
        )
    ax.set_xticks(positions, [ratio_label(ratio) for ratio in ratios])
    ax.set_xlabel("imbalance ratio")
    ax.set_ylabel(f"recall of the minority class ({results.minority_class}), k-fold mean")
    ax.set_title("Minority recall")
    ax.legend(fontsize="small")
    save_figure(fig, paths["minority-recall"], dpi=130)

    cited = {label: path.relative_to(base or folder).as_posix() for label, path in paths.items()}
    return [
        Figure(
            "comparison-f1-params",
            cited["f1-params"],
            "k-fold F1 (mean ± standard deviation) against the student's parameters, one line per teacher and the no-KD students, "
            "one panel per imbalance ratio.",
        ),
        Figure(
            "comparison-kd-gain",
            cited["kd-gain"],
            "KD gain (mean paired F1 difference KD − no-KD over the fold entries) against the imbalance ratio, per teacher and "
            f"student; a star marks a gain whose Holm-adjusted corrected t-test p is below {SIGNIFICANCE:g}.",
        ),
        Figure(
            "comparison-minority-recall",
            cited["minority-recall"],
            f"Recall of the minority class ({results.minority_class}), mean over the fold entries, against the imbalance ratio: "
            "KD students (solid) and no-KD students (dashed) of each size.",
        ),
    ]


def render_markdown(results: ComparisonResults, figures: list[Figure] | None = None) -> str:
    """The comparison's tables (and ``figures``, from :func:`plot_comparison`) as Markdown."""
    return to_markdown(comparison_blocks(results, figures or []))


def render_latex(results: ComparisonResults, figures: list[Figure] | None = None) -> str:
    """The comparison's tables (and ``figures``) as LaTeX (booktabs tables, as the report's)."""
    return to_latex(comparison_blocks(results, figures or []))


def write_comparison_tables(comparison_run_id: str, out_dir: Path | str) -> list[Path]:
    """Write ``comparison.md``, ``comparison.tex`` and the figures' PNGs into ``out_dir`` and log them to the comparison
    run under ``comparison/``; returns the files written."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    results = comparison_results(comparison_run_id)
    figures = plot_comparison(results, folder)
    markdown, latex = folder / "comparison.md", folder / "comparison.tex"
    markdown.write_text(render_markdown(results, figures))
    latex.write_text(render_latex(results, figures))
    written = [markdown, latex, *(folder / figure.path for figure in figures)]
    client = MlflowClient()
    for path in written:
        client.log_artifact(comparison_run_id, str(path), ARTIFACT_FOLDER)
    logger().info(
        f"comparison {results.name}: {len(results.cells)} cells -> {folder} (also logged to run {comparison_run_id} under comparison/)"
    )
    return written


def write_tables_when_complete(comparison_run_id: str, cfg: Config) -> list[Path]:
    """:func:`write_comparison_tables` into ``reports/comparison-<comparison_name>`` once every cell of the comparison has
    finished (its ``cells_finished`` equals its ``cells_total``); a worker that ends first leaves them to the last one."""
    metrics = MlflowClient().get_run(comparison_run_id).data.metrics
    if metrics.get(Metric.CELLS_FINISHED) != metrics.get(Metric.CELLS_TOTAL):
        return []
    return write_comparison_tables(comparison_run_id, PROJECT_ROOT / "reports" / f"comparison-{cfg.comparison_name}")
