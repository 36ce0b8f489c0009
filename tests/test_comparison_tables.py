"""The KD comparison's tables, figures and report section, from a real MLflow store (SQLite) holding a comparison run,
its nested cell runs and the teacher runs they name, with seeded random fold scores as the comparison writes them
(docs: /work/notes/compare_interface.md's tags and metrics). Every number in the tables is checked against the runs'
metrics and against the corrected t-test and Holm's correction recomputed from the logged fold scores."""

from __future__ import annotations

import re
from dataclasses import replace

import mlflow
import numpy as np
import pytest
from kdtest import tracking_at
from mlflow import MlflowClient

from pipelines.config import PipelineError
from pipelines.evaluation.statistics import corrected_resampled_t_test
from pipelines.names import Metric, RunTag
from registry.report.comparison import FIGURES, render_latex, render_markdown, write_comparison_tables
from registry.report.document import latex_escape, num, to_markdown
from registry.report.gather import comparison_results, find_comparison
from registry.report.results import comparison_result
from registry.report.stats import baseline_table, kd_table

FOLDS, REPEATS = 3, 2
FOLD_COUNT = FOLDS * REPEATS
CLASSES, MINORITY = ("no", "yes"), "yes"
TEACHERS = {"resnet": 250_000, "hybrid:S": 90_000}
STUDENTS = {"tiny": 1_500, "small": 6_000}
RATIOS = ("0", "5")
DIGEST = "ab" * 32
# KD from resnet helps the small student a lot (a clear effect); every other cell is noise around its no-KD twin.
GAIN = {("resnet", "small"): 0.3}


def cv_metrics(rng: np.random.Generator, level: float) -> dict[str, float]:
    """Fold scores around ``level`` and the summaries a cross-validated run logs from them (std with ddof 1)."""
    metrics: dict[str, float] = {}
    columns = {
        "f1": (Metric.fold_f1, level),
        "f1_minority": (Metric.minority_fold_f1, level - 0.1),
        "recall_minority": (Metric.minority_fold_recall, level - 0.05),
    }
    for name, (key, centre) in columns.items():
        scores = np.clip(centre + rng.normal(0.0, 0.03, FOLD_COUNT), 0.0, 1.0)
        metrics |= {key(k): float(score) for k, score in enumerate(scores)}
        metrics[f"{name}_mean"], metrics[f"{name}_std"] = float(scores.mean()), float(scores.std(ddof=1))
    for class_name, centre in zip(CLASSES, (level + 0.05, level - 0.1)):
        scores = np.clip(centre + rng.normal(0.0, 0.03, FOLD_COUNT), 0.0, 1.0)
        metrics[f"f1_{class_name}_mean"], metrics[f"f1_{class_name}_std"] = float(scores.mean()), float(scores.std(ddof=1))
    metrics["f1_macro_mean"], metrics["f1_macro_std"] = float(rng.uniform(0.6, 0.9)), float(rng.uniform(0.01, 0.05))
    return metrics


def cell_tags(name: str, teacher: str, student: str, kd: bool, ratio: str, source: str) -> dict[str, str]:
    return {
        RunTag.STEP: "compare-cell",
        RunTag.COMPARISON: name,
        RunTag.CELL_TEACHER: teacher if kd else "",
        RunTag.CELL_STUDENT: student,
        RunTag.CELL_KD: "true" if kd else "false",
        RunTag.CELL_IMBALANCE: ratio,
        RunTag.CELL_SOURCE_RUN_ID: source,
    }


def step_run(step: str, params: dict[str, object], metrics: dict[str, float]) -> str:
    """A finished top-level run of a step (teacher, distill) with the data parameters every step run logs."""
    with mlflow.start_run(run_name=step) as run:
        mlflow.set_tags({RunTag.STEP: step, RunTag.DATA_DIGEST: DIGEST})
        mlflow.log_params({"classes": ",".join(CLASSES), "folds": FOLDS, "repeats": REPEATS, **params})
        mlflow.log_metrics(metrics)
    return run.info.run_id


def build_comparison(name: str = "sizes", digest: str = DIGEST, seed: int = 0, status: str = "FINISHED") -> str:
    """A comparison run as the runner leaves it: teacher runs per ratio, a source distill run and a nested cell run
    per cell, plus a failed earlier attempt at one cell (which must not count)."""
    rng = np.random.default_rng(seed)
    teachers = {
        (teacher, ratio): step_run("teacher", {"teacher_arch": teacher}, {**cv_metrics(rng, 0.85), Metric.TEACHER_PARAMS: size})
        for teacher, size in TEACHERS.items()
        for ratio in RATIOS
    }
    baseline = {(student, ratio): 0.6 + rng.uniform(-0.05, 0.05) for student in STUDENTS for ratio in RATIOS}
    cells = []  # (tags, metrics)
    for ratio in RATIOS:
        for student, size in STUDENTS.items():
            level = baseline[student, ratio]
            metrics = {**cv_metrics(rng, level), Metric.STUDENT_PARAMS: size}
            source = step_run("distill", {"student_size": student, "no_kd": "true"}, metrics)
            cells.append((cell_tags(name, "", student, False, ratio, source), metrics))
            for teacher in TEACHERS:
                metrics = {**cv_metrics(rng, level + GAIN.get((teacher, student), 0.0)), Metric.STUDENT_PARAMS: size}
                if ratio != "0":  # a subsampled minority: fewer training rows per validation row, as the runner logs it
                    metrics[Metric.TEST_TRAIN_RATIO] = 1 / (FOLDS - 1) * (1 + float(ratio) / 10)
                source = step_run("distill", {"student_size": student, "teacher_arch": teacher}, metrics)
                tags = {**cell_tags(name, teacher, student, True, ratio, source), RunTag.TEACHER_RUN_ID: teachers[teacher, ratio]}
                cells.append((tags, metrics))
    client = MlflowClient()
    with mlflow.start_run(run_name="compare") as parent:
        mlflow.set_tags({RunTag.STEP: "compare", RunTag.COMPARISON: name, RunTag.MINORITY_CLASS: MINORITY, RunTag.DATA_DIGEST: digest})
        mlflow.log_params(
            {
                "folds": FOLDS,
                "repeats": REPEATS,
                "teachers": "/".join(TEACHERS),
                "students": ",".join(STUDENTS),
                "imbalance": ",".join(RATIOS),
                "minority_class": MINORITY,
                "comparison_name": name,
                "temperature": 5.0,
                "alpha": 0.5,
                "epochs": 2,
                "seed": seed,
            }
        )
        mlflow.log_metrics({Metric.CELLS_TOTAL: len(cells), Metric.CELLS_FINISHED: len(cells)})
        failed_tags, failed_metrics = cells[1]  # an attempt that died: absurd scores that must appear nowhere
        with mlflow.start_run(run_name="cell", nested=True) as failed:
            mlflow.set_tags(failed_tags)
            mlflow.log_metrics({key: 0.0123 for key in failed_metrics})
        client.set_terminated(failed.info.run_id, "FAILED")
        for tags, metrics in cells:
            with mlflow.start_run(run_name="cell", nested=True):
                mlflow.set_tags(tags)
                mlflow.log_metrics(metrics)
    if status != "FINISHED":
        client.set_terminated(parent.info.run_id, status)
    return parent.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("comparison")
    with tracking_at(f"sqlite:///{root / 'mlflow.db'}"):
        yield root, build_comparison()


def finished_cells(run_id: str) -> list:
    """The comparison's finished cell runs read straight from the store, without the module under test."""
    return MlflowClient().search_runs(["0"], f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'FINISHED'")


def holm_by_hand(pvalues: list[float]) -> list[float]:
    """Holm's adjusted p written from its definition: the i-th smallest p_(i) becomes max over j <= i of
    min(1, (m - j + 1) p_(j)) (ranks from 1)."""
    m, order = len(pvalues), sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    for rank, index in enumerate(order, start=1):
        adjusted[index] = max(min(1.0, (m - j + 1) * pvalues[order[j - 1]]) for j in range(1, rank + 1))
    return adjusted


def test_the_kd_table_equals_the_cell_runs_and_the_corrected_t_test_of_their_folds(store) -> None:
    _, run_id = store
    runs = finished_cells(run_id)
    assert len(runs) == len(RATIOS) * len(STUDENTS) * (len(TEACHERS) + 1)
    twins = {
        (r.data.tags[RunTag.CELL_STUDENT], r.data.tags[RunTag.CELL_IMBALANCE]): r for r in runs if r.data.tags[RunTag.CELL_KD] == "false"
    }
    table = kd_table(comparison_results(run_id))
    assert len(table) == len(RATIOS) * len(STUDENTS) * len(TEACHERS)
    by_run = {row.run_id: row for row in table.itertuples()}
    for run in (r for r in runs if r.data.tags[RunTag.CELL_KD] == "true"):
        tags, metrics = run.data.tags, run.data.metrics
        row, twin = by_run[run.info.run_id], twins[tags[RunTag.CELL_STUDENT], tags[RunTag.CELL_IMBALANCE]]
        assert (row.teacher, row.student, row.ratio, row.no_kd_run_id) == (
            tags[RunTag.CELL_TEACHER],
            tags[RunTag.CELL_STUDENT],
            tags[RunTag.CELL_IMBALANCE],
            twin.info.run_id,
        )
        assert row.student_params == metrics[Metric.STUDENT_PARAMS]
        assert (row.f1_mean, row.f1_std) == (metrics["f1_mean"], metrics["f1_std"])
        assert (row.f1_minority_mean, row.f1_minority_std) == (metrics["f1_minority_mean"], metrics["f1_minority_std"])
        assert row.recall_minority_mean == metrics["recall_minority_mean"]
        for family, key in (("f1", Metric.fold_f1), ("f1_minority", Metric.minority_fold_f1)):
            kd = [metrics[key(k)] for k in range(FOLD_COUNT)]
            no_kd = [twin.data.metrics[key(k)] for k in range(FOLD_COUNT)]
            assert getattr(row, f"delta_{family}") == pytest.approx(np.mean(np.subtract(kd, no_kd)), abs=1e-12)
            # k-fold: each fold is tested against the other FOLDS - 1, the train/test ratio of Nadeau and Bengio, unless the
            # cell logged its own (a subsampled minority)
            expected = corrected_resampled_t_test(kd, no_kd, metrics.get(Metric.TEST_TRAIN_RATIO, 1 / (FOLDS - 1)))
            assert getattr(row, f"p_{family}") == pytest.approx(expected.pvalue, rel=1e-12)
    for family in ("f1", "f1_minority"):
        assert table[f"p_{family}_holm"].tolist() == pytest.approx(holm_by_hand(table[f"p_{family}"].tolist()))
    strong = table[(table["teacher"] == "resnet") & (table["student"] == "small")]
    assert (strong["delta_f1"] > 0.05).all() and (strong["p_f1_holm"] < 0.05).all(), "a 0.3 gain over 6 folds is found"


def test_holm_by_hand_agrees_with_a_worked_example() -> None:
    # the example of tests/test_statistics.py, so the test's own Holm is checked too
    assert holm_by_hand([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_the_baseline_table_has_every_teacher_and_no_kd_student_per_ratio_as_logged(store) -> None:
    _, run_id = store
    results = comparison_results(run_id)
    table = baseline_table(results)
    teachers = {cell.tags[RunTag.TEACHER_RUN_ID] for cell in results.cells if cell.kd}
    no_kd = {cell.run.info.run_id for cell in results.cells if not cell.kd}
    assert set(table["run_id"]) == teachers | no_kd and len(table) == len(teachers | no_kd)
    client = MlflowClient()
    for row in table.to_dict("records"):
        run = client.get_run(row["run_id"])
        for key in ("f1", "f1_macro", "f1_no", "f1_yes"):
            assert (row[f"{key}_mean"], row[f"{key}_std"]) == (run.data.metrics[f"{key}_mean"], run.data.metrics[f"{key}_std"])
        params = Metric.TEACHER_PARAMS if row["kind"] == "teacher" else Metric.STUDENT_PARAMS
        assert row["params"] == run.data.metrics[params]
        assert row["model"] == (run.data.params["teacher_arch"] if row["kind"] == "teacher" else run.data.tags[RunTag.CELL_STUDENT])


def test_markdown_and_latex_show_every_cell_and_the_failed_attempt_nowhere(store) -> None:
    _, run_id = store
    results = comparison_results(run_id)
    markdown, latex = render_markdown(results), render_latex(results)
    import markdown_it

    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(markdown)
    assert sum(t.type == "table_open" for t in tokens) == 2
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| teacher")]
    for row in kd_table(results).itertuples():
        cells = [row.teacher, row.student, "as is" if row.ratio == "0" else row.ratio, num(row.student_params, 0)]
        numbers = [f"{num(row.f1_mean)} ± {num(row.f1_std)}", num(row.delta_f1), num(row.p_f1), num(row.p_f1_holm)]
        numbers += [f"{num(row.f1_minority_mean)} ± {num(row.f1_minority_std)}", num(row.delta_f1_minority)]
        numbers += [num(row.p_f1_minority), num(row.p_f1_minority_holm)]
        line = "| " + " | ".join(cells + numbers) + " |"
        assert line in rows, line
        assert " & ".join(latex_escape(c) for c in cells + numbers) + r" \\" in latex
    for row in baseline_table(results).itertuples():
        assert f"{num(row.f1_mean)} ± {num(row.f1_std)}" in markdown and f"{num(row.f1_yes_mean)} ± {num(row.f1_yes_std)}" in markdown
    assert "0.0123" not in markdown, "the failed attempt at a cell is not one of its results"
    assert "F1 yes (minority)" in markdown and latex.isascii()
    assert sorted(re.findall(r"\\begin\{(\w+)\}", latex)) == sorted(re.findall(r"\\end\{(\w+)\}", latex))


def test_write_comparison_tables_writes_and_logs_every_file_to_the_comparison_run(store) -> None:
    root, run_id = store
    written = write_comparison_tables(run_id, root / "tables")
    names = {"comparison.md", "comparison.tex", *FIGURES.values()}
    assert {path.name for path in written} == names and all(path.stat().st_size > 0 for path in written)
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in written if path.suffix == ".png")
    markdown = (root / "tables" / "comparison.md").read_text()
    assert all(f"]({name})" in markdown for name in FIGURES.values()), "the Markdown shows the figures beside it"
    logged = {artifact.path for artifact in MlflowClient().list_artifacts(run_id, "comparison")}
    assert logged == {f"comparison/{name}" for name in names}


def test_the_report_finds_the_comparison_of_its_data_and_no_other(store) -> None:
    _, run_id = store
    assert find_comparison(data_digest=DIGEST).info.run_id == run_id
    assert find_comparison(data_digest="cd" * 32) is None, "a comparison on other data is not the version's"
    assert find_comparison() is None
    assert find_comparison("sizes").info.run_id == run_id and find_comparison(run_id).info.run_id == run_id
    with pytest.raises(PipelineError, match="^comparison='nothing': no finished comparison run"):
        find_comparison("nothing")
    killed = build_comparison("killed", digest="ef" * 32, seed=1, status="KILLED")
    assert find_comparison(data_digest="ef" * 32) is None, "an unfinished comparison is not reported by itself"
    assert find_comparison(killed).info.run_id == killed, "but one asked for by id is"
    other = build_comparison("other", digest="cd" * 32, seed=2)
    assert find_comparison("other").info.run_id == other and find_comparison(data_digest=DIGEST).info.run_id == run_id


def test_the_report_section_shows_the_comparison_when_there_is_one(store) -> None:
    root, run_id = store
    folder = root / "report"
    blocks = comparison_result(comparison_results(run_id), folder)
    markdown = to_markdown(blocks)
    assert markdown.startswith("## Comparison") and markdown.count("**Table") == 2
    for name in FIGURES.values():
        assert f"](figures/comparison-{name})" in markdown and (folder / "figures" / f"comparison-{name}").is_file()
    assert comparison_result(None, folder) == []


def test_a_kd_cell_without_its_no_kd_twin_or_a_fold_entry_is_refused(store) -> None:
    _, run_id = store
    results = comparison_results(run_id)
    with pytest.raises(PipelineError, match="has no finished no-KD cell of its student and ratio"):
        kd_table(replace(results, cells=[cell for cell in results.cells if cell.kd]))
    run = MlflowClient().get_run(run_id)
    run.data.params["repeats"] = str(REPEATS + 1)  # more fold entries than the cells logged
    with pytest.raises(PipelineError, match=f"has no {Metric.fold_f1(FOLD_COUNT)}, "):
        kd_table(replace(results, run=run))
