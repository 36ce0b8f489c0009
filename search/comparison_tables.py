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

:func:`write_comparison_tables` writes them as Markdown, LaTeX and PNG and logs them to the comparison run
(``comparison/``); the report (``registry.report``) includes the same blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from pipelines.config import PipelineError
from pipelines.document import Block, Figure, Heading, num, para, table, to_latex, to_markdown
from pipelines.evaluation.metrics import class_keys, pyplot, save_figure
from pipelines.evaluation.statistics import corrected_resampled_t_test, holm, kfold_test_train_ratio
from pipelines.names import Metric, RunTag

COMPARE_STEP = "compare"  # the comparison run's kd.step
ARTIFACT_FOLDER = "comparison"
SIGNIFICANCE = 0.05  # Holm-adjusted p below which a figure marks a KD gain
FIGURES = {
    "f1-params": "f1-vs-student-params.png",
    "kd-gain": "kd-gain-vs-imbalance.png",
    "minority-recall": "minority-recall-vs-imbalance.png",
}


@dataclass(frozen=True)
class Cell:
    """One cell run of a comparison."""

    run: Run

    @property
    def tags(self) -> dict[str, str]:
        return self.run.data.tags

    @property
    def metrics(self) -> dict[str, float]:
        return self.run.data.metrics

    @property
    def kd(self) -> bool:
        return self.tags[RunTag.CELL_KD] == "true"

    @property
    def teacher(self) -> str:
        return self.tags[RunTag.CELL_TEACHER] if self.kd else ""

    @property
    def student(self) -> str:
        return self.tags[RunTag.CELL_STUDENT]

    @property
    def ratio(self) -> str:
        return self.tags[RunTag.CELL_IMBALANCE]

    @property
    def teacher_run_ids(self) -> list[str]:
        """The teacher run (or an ensemble's member runs) a KD cell distilled from; none for a no-KD cell."""
        return [run_id for run_id in self.tags.get(RunTag.TEACHER_RUN_ID, "").split(",") if run_id] if self.kd else []

    def describe(self) -> str:
        kind = f"KD from {self.teacher}" if self.kd else "no-KD"
        return f"cell run {self.run.info.run_id} ({kind}, student {self.student}, ratio {self.ratio})"


@dataclass(frozen=True)
class ComparisonResults:
    """A comparison run with its finished cells and the teacher runs they name."""

    run: Run
    cells: list[Cell]  # the newest finished run of each cell, in (ratio, KD first, teacher, student parameters) order
    teachers: dict[str, Run]  # teacher run id -> run
    class_names: list[str]

    @property
    def name(self) -> str:
        return self.run.data.tags[RunTag.COMPARISON]

    @property
    def minority_class(self) -> str:
        return self.run.data.tags.get(RunTag.MINORITY_CLASS, self.run.data.params.get("minority_class", ""))

    @property
    def folds(self) -> int:
        return int(self.run.data.params["folds"])

    @property
    def fold_count(self) -> int:
        """Validation fold entries: folds x repeats, numbered k = repeat * folds + fold."""
        return self.folds * int(self.run.data.params.get("repeats", "1"))

    @property
    def test_train_ratio(self) -> float:
        """n_test / n_train of one split for the corrected t-test at imbalance ratio 0. Every training image of a repeat
        is validated in exactly one of its folds and trained on in the others, so over the fold entries mean n_test / mean
        n_train is 1 / (folds - 1) whatever the fold sizes. A subsampled ratio trains on fewer rows: its cells log their
        own (``test_train_ratio``), which :func:`kd_table` prefers."""
        return kfold_test_train_ratio(self.folds)

    @property
    def ratios(self) -> list[str]:
        return sorted({cell.ratio for cell in self.cells}, key=float)


def ratio_label(ratio: str) -> str:
    """An imbalance ratio as tables and figures print it: ``0`` is the data as it is."""
    return "as is" if float(ratio) == 0 else ratio


def find_comparison(comparison: str = "", data_digest: str = "") -> Run | None:
    """The comparison run named by ``comparison`` (a run id, or a comparison name: its newest finished run), else the
    newest finished comparison on the data of ``data_digest``; None when neither is given or none matches the digest.
    A ``comparison`` that names nothing is an error: it was asked for."""
    client = MlflowClient()
    if comparison:
        try:
            run = client.get_run(comparison)
        except MlflowException:  # not a run id: a comparison name
            run = None
        if run is not None and run.data.tags.get(RunTag.STEP) == COMPARE_STEP and RunTag.CELL_KD not in run.data.tags:
            return run
        found = _comparison_runs(f"tags.`{RunTag.COMPARISON}` = '{comparison}'")
        if not found:
            raise PipelineError(
                f"comparison={comparison!r}: no finished comparison run has that name or id; run `mlflow run . -e compare` "
                "or give the name (tag kd.comparison) or run id of one"
            )
        return found[0]
    if not data_digest:
        return None
    return next(iter(_comparison_runs(f"tags.`{RunTag.DATA_DIGEST}` = '{data_digest}'")), None)


def _comparison_runs(condition: str) -> list[Run]:
    """Finished comparison runs (not their cells) matching ``condition``, newest first, in every experiment."""
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{RunTag.STEP}` = '{COMPARE_STEP}' and {condition} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return [run for run in runs if RunTag.CELL_KD not in run.data.tags]


def comparison_results(comparison_run_id: str) -> ComparisonResults:
    """Read a comparison run, its finished cell runs (the newest of each cell, should one have been run again) and the
    teacher runs its KD cells name."""
    client = MlflowClient()
    run = client.get_run(comparison_run_id)
    name = run.data.tags.get(RunTag.COMPARISON)
    if not name or RunTag.CELL_KD in run.data.tags:
        raise PipelineError(f"run {comparison_run_id} is not a comparison run (it has no tag {RunTag.COMPARISON}, or is one of its cells)")
    found = mlflow.search_runs(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{comparison_run_id}' and tags.`{RunTag.COMPARISON}` = '{name}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    newest: dict[tuple[object, ...], Cell] = {}
    for cell in (Cell(found_run) for found_run in found if found_run.data.tags.get(RunTag.CELL_KD) in ("true", "false")):
        newest.setdefault((cell.kd, cell.teacher, cell.student, cell.ratio), cell)
    cells = list(newest.values())
    if not cells:
        raise PipelineError(f"comparison {name!r} (run {comparison_run_id}) has no finished cell runs yet")
    cells.sort(key=lambda c: (float(c.ratio), not c.kd, c.teacher, c.metrics.get(Metric.STUDENT_PARAMS, math.inf), c.student))
    teachers = {run_id: client.get_run(run_id) for cell in cells for run_id in cell.teacher_run_ids}
    # The class names as the data's runs logged them (pipelines.tracking.runs.log_data): a teacher's, else a cell's source run.
    source = next(iter(teachers.values()), None) or client.get_run(cells[0].tags[RunTag.CELL_SOURCE_RUN_ID])
    return ComparisonResults(run, cells, teachers, source.data.params["classes"].split(","))


def fold_scores(metrics: dict[str, float], fold_count: int, key: Callable[[int], str], owner: str) -> list[float]:
    """The metric ``key(k)`` of every validation fold entry k (folds x repeats) in entry order, for a paired test."""
    missing = [key(k) for k in range(fold_count) if key(k) not in metrics]
    if missing:
        raise PipelineError(f"{owner} has no {', '.join(missing)}; the paired test needs every fold entry (0 to {fold_count - 1})")
    return [metrics[key(k)] for k in range(fold_count)]


def baseline_table(results: ComparisonResults) -> pd.DataFrame:
    """One row per teacher run and per no-KD cell at each ratio: k-fold F1, macro F1 and each class's F1, mean and
    standard deviation over the fold entries, as their runs logged them (NaN where a run lacks one)."""
    keys = ["f1", "f1_macro", *(f"f1_{key}" for key in class_keys(results.class_names))]
    rows, seen = [], set()
    for cell in results.cells:
        if cell.kd:
            members = [(results.teachers[run_id], "teacher", Metric.TEACHER_PARAMS) for run_id in cell.teacher_run_ids]
        else:
            members = [(cell.run, "no-KD student", Metric.STUDENT_PARAMS)]
        for run, kind, params in members:
            if (run.info.run_id, cell.ratio) in seen:  # a teacher serves every student of its ratio: one row
                continue
            seen.add((run.info.run_id, cell.ratio))
            metrics = run.data.metrics
            model = run.data.params.get("teacher_arch", cell.teacher) if kind == "teacher" else cell.student
            row = {"ratio": cell.ratio, "model": model, "kind": kind, "params": metrics.get(params, math.nan), "run_id": run.info.run_id}
            for key in keys:
                row[f"{key}_mean"], row[f"{key}_std"] = metrics.get(f"{key}_mean", math.nan), metrics.get(f"{key}_std", math.nan)
            rows.append(row)
    return pd.DataFrame(rows)


# The two families of KD - no-KD differences: (column prefix, per-fold metric, mean and std metrics)
FAMILIES = {
    "f1": (Metric.fold_f1, Metric.F1_MEAN, Metric.F1_STD),
    "f1_minority": (Metric.minority_fold_f1, Metric.F1_MINORITY_MEAN, Metric.F1_MINORITY_STD),
}


def kd_table(results: ComparisonResults) -> pd.DataFrame:
    """One row per KD cell: its F1 and minority F1 (mean, std), minority recall, and for each family the mean paired
    difference KD - no-KD over the fold entries (``delta_<family>``), its corrected resampled t-test p-value
    (``p_<family>``) and Holm's adjustment of that p across every KD cell (``p_<family>_holm``)."""
    twins = {(cell.student, cell.ratio): cell for cell in results.cells if not cell.kd}
    rows = []
    for cell in (cell for cell in results.cells if cell.kd):
        twin = twins.get((cell.student, cell.ratio))
        if twin is None:
            raise PipelineError(f"{cell.describe()} has no finished no-KD cell of its student and ratio to be compared with")
        row = {
            "teacher": cell.teacher,
            "student": cell.student,
            "ratio": cell.ratio,
            "student_params": cell.metrics.get(Metric.STUDENT_PARAMS, math.nan),
            "recall_minority_mean": cell.metrics.get(Metric.RECALL_MINORITY_MEAN, math.nan),
            "no_kd_recall_minority_mean": twin.metrics.get(Metric.RECALL_MINORITY_MEAN, math.nan),
            "run_id": cell.run.info.run_id,
            "no_kd_run_id": twin.run.info.run_id,
            "test_train_ratio": cell.metrics.get(Metric.TEST_TRAIN_RATIO, results.test_train_ratio),
        }
        for family, (fold_key, mean_key, std_key) in FAMILIES.items():
            kd_scores = fold_scores(cell.metrics, results.fold_count, fold_key, cell.describe())
            no_kd_scores = fold_scores(twin.metrics, results.fold_count, fold_key, twin.describe())
            test_train = cell.metrics.get(Metric.TEST_TRAIN_RATIO, results.test_train_ratio)
            test = corrected_resampled_t_test(kd_scores, no_kd_scores, test_train)
            row |= {
                f"{family}_mean": cell.metrics.get(mean_key, math.nan),
                f"{family}_std": cell.metrics.get(std_key, math.nan),
                f"no_kd_{family}_mean": twin.metrics.get(mean_key, math.nan),
                f"delta_{family}": test.mean_difference,
                f"t_{family}": test.t,
                f"p_{family}": test.pvalue,
            }
        rows.append(row)
    if not rows:
        raise PipelineError(f"comparison {results.name!r} (run {results.run.info.run_id}) has no finished KD cell yet")
    frame = pd.DataFrame(rows)
    for family in FAMILIES:
        frame[f"p_{family}_holm"] = holm(frame[f"p_{family}"].tolist())
    return frame


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


def comparison_numbers(results: ComparisonResults) -> dict:
    """Every number of the comparison's tables, with the runs they come from (for ``report.json``)."""
    return {
        "run_id": results.run.info.run_id,
        "name": results.name,
        "test_train_ratio": results.test_train_ratio,
        "baseline": baseline_table(results).to_dict("records"),
        "kd": kd_table(results).to_dict("records"),
    }


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
    print(f"comparison {results.name}: {len(results.cells)} cells -> {folder} (also logged to run {comparison_run_id} under comparison/)")
    return written
