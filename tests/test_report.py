"""The report, for real: a tiny search and promotion in a temporary tracking store (2 repeats of 2-fold
cross-validation), then the methodology and results written from it. Every number in the tables is parsed back
and compared with the logged value, the KD vs no-KD test with its recomputation from the logged fold scores;
changing a logged metric changes the report. Also the `mlflow run . -e report` and `kd
explain` commands as a user runs them."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from kdtest import MODEL, assert_calibration_table, child_env, tiny_config, tracking_at
from mlflow import MlflowClient

from pipelines.config import PipelineError
from pipelines.evaluation.statistics import corrected_resampled_t_test, kfold_test_train_ratio
from pipelines.names import RunTag
from registry.fetch import resolve_version
from registry.promote import promote
from registry.report import write_report
from registry.report.gather import MODELS
from registry.report.stats import METRICS
from search.tune import run_search

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
RESAMPLES = 200


@pytest.fixture(scope="module")
def tracked(mri_subset, tmp_path_factory):
    """A tracking store with a finished tiny search and a promoted version, and its first report."""
    root = tmp_path_factory.mktemp("report")
    with tracking_at(f"sqlite:///{root / 'mlflow.db'}"):
        cfg = tiny_config(mri_subset, root, study_name="report-test", repeats=2)
        run_search(cfg)
        promote(cfg)
        paths = write_report(MODEL, stage="Production", out_dir=root / "report", resamples=RESAMPLES)
        yield root, paths


def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """Each Markdown table (keyed by its caption's first words) as rows of cells, header first."""
    tables, caption, rows = {}, None, []
    for line in text.splitlines() + [""]:
        if line.startswith("**Table"):
            caption = line.split("**", 2)[2].strip()
        elif line.startswith("|") and caption is not None:
            if not set(line.replace("|", "").split()) <= {"---"}:
                rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif rows:
            tables[caption], caption, rows = rows, None, []
    return tables


def table_starting(tables: dict[str, list[list[str]]], prefix: str) -> list[list[str]]:
    [match] = [rows for caption, rows in tables.items() if caption.startswith(prefix)]
    return match


def runs_of_report(paths) -> dict[str, object]:
    client = MlflowClient()
    version = resolve_version(MODEL, stage="Production")
    promote_run = client.get_run(version.run_id)
    return {
        "promote": promote_run,
        "teacher": client.get_run(version.tags["teacher_run_id"]),
        "student": client.get_run(promote_run.data.tags[RunTag.TRIAL_RUN_ID]),
        "no_kd": client.get_run(promote_run.data.tags[RunTag.NO_KD_CV_RUN_ID]),
    }


def parse(cell: str) -> float:
    return math.nan if cell == "n/a" else float(cell)


def close(cell: str, logged: float) -> bool:
    value = parse(cell)
    return (math.isnan(value) and math.isnan(logged)) or abs(value - logged) <= 5e-5


def test_every_table_figure_equals_the_logged_value(tracked):
    _, paths = tracked
    runs = runs_of_report(paths)
    tables = markdown_tables(paths.results_md.read_text())
    labels = list(METRICS.values())
    columns = list(MODELS)

    kfold = table_starting(tables, "Stratified group")
    assert kfold[0] == ["metric"] + list(MODELS.values())
    assert [row[0] for row in kfold[1:]] == labels
    for row, metric in zip(kfold[1:], METRICS):
        for cell, who in zip(row[1:], columns):
            mean, std = cell.split(" ± ")
            metrics = runs[who].data.metrics
            assert close(mean, metrics[f"{metric}_mean"]) and close(std, metrics[f"{metric}_std"]), (metric, who, cell)

    holdout = table_starting(tables, "Hold-out test split")
    for row, metric in zip(holdout[1:], METRICS):
        for cell, who in zip(row[1:], columns):
            value, low, high = re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cell).groups()
            assert close(value, runs["promote"].data.metrics[f"holdout_{who}_{metric}"]), (metric, who, cell)
            if value != "n/a" and low != "n/a":
                assert parse(low) <= parse(high)

    folds = table_starting(tables, "F1 per validation fold")
    for row in folds[1:]:
        k = int(row[0])
        for cell, who in zip(row[1:4], columns):
            assert close(cell, runs[who].data.metrics[f"f1_fold_{k}"])
        assert close(row[4], runs["student"].data.metrics[f"f1_fold_{k}"] - runs["no_kd"].data.metrics[f"f1_fold_{k}"])

    methods = paths.methodology_md.read_text()
    params = runs["student"].data.params
    assert f"T = {float(params['temperature']):.4f}" in methods and rf"\alpha = {float(params['alpha']):.4f}" in methods
    assert f"{int(runs['promote'].data.metrics['student_params'])} parameters" in methods
    assert f"{int(runs['teacher'].data.metrics['teacher_params'])} parameters" in methods
    assert runs["promote"].data.tags["kd.data_digest"] in methods
    for run in runs.values():
        assert run.info.run_id in methods
    counts = table_starting(markdown_tables(methods), "Images per class")
    assert counts[-1][0] == "total" and int(counts[-1][3]) == int(runs["teacher"].data.params["n_images"])


def test_the_kd_vs_no_kd_test_is_the_corrected_t_test_of_every_logged_fold_of_every_repeat(tracked):
    _, paths = tracked
    runs = runs_of_report(paths)
    folds, repeats = (int(float(runs["teacher"].data.params[name])) for name in ("folds", "repeats"))
    n = folds * repeats
    assert repeats == 2
    teacher_models = {a.path for a in MlflowClient().list_artifacts(runs["teacher"].info.run_id, "models")}
    assert teacher_models == {f"models/fold_{k}.keras" for k in range(n)} | {"models/all.keras"}, "a teacher per (repeat, fold)"
    for who in ("student", "no_kd"):  # the trial and the no-KD distill run: an F1 per (repeat, fold), k = repeat * folds + fold
        logged = {key for key in runs[who].data.metrics if re.fullmatch(r"f1_fold_\d+", key)}
        assert logged == {f"f1_fold_{k}" for k in range(n)}, (who, sorted(logged))
    kd, no_kd = ([runs[who].data.metrics[f"f1_fold_{k}"] for k in range(n)] for who in ("student", "no_kd"))
    expected = corrected_resampled_t_test(kd, no_kd, kfold_test_train_ratio(folds))

    results = paths.results_md.read_text()
    found = re.search(
        r"KD vs no-KD over n = (\d+) paired fold scores(?: \([^)]*\))?: mean F1 difference (\S+); "
        r"corrected resampled t-test t = (\S+), df = (\d+), p = (\S+);",
        results,
    )
    assert found, [line for line in results.splitlines() if "KD vs no-KD" in line]
    shown_n, difference, t, df, p = found.groups()
    assert int(shown_n) == expected.n == n and int(df) == expected.df == n - 1
    assert close(difference, expected.mean_difference) and close(t, expected.t) and close(p, expected.pvalue)
    assert len(table_starting(markdown_tables(results), "F1 per validation fold")) == 1 + n
    numbers = json.loads(paths.numbers.read_text())["paired_test"]
    assert numbers["n"] == n and numbers["t"] == pytest.approx(expected.t) and numbers["t_pvalue"] == pytest.approx(expected.pvalue)
    assert f"n = {n} folds" in paths.methodology_md.read_text()


def test_the_per_class_f1_table_equals_the_logged_values(tracked):
    from pipelines.evaluation.metrics import class_keys

    _, paths = tracked
    runs = runs_of_report(paths)
    rows = table_starting(markdown_tables(paths.results_md.read_text()), "F1 per class and macro-F1")
    class_names = runs["teacher"].data.params["classes"].split(",")
    assert rows[0] == ["class"] + list(MODELS.values()) and [row[0] for row in rows[1:]] == class_names + ["macro"]
    for row, key in zip(rows[1:], [f"f1_{key}" for key in class_keys(class_names)] + ["f1_macro"]):
        for cell, who in zip(row[1:], MODELS):
            kfold, holdout = cell.split(" / ")
            assert close(kfold, runs[who].data.metrics[f"{key}_mean"]), (key, who, cell)
            assert close(holdout, runs["promote"].data.metrics[f"holdout_{who}_{key}"]), (key, who, cell)
    # macro-F1 is the mean of the class rows, also for two classes (where it is not the positive class's F1)
    for column in range(1, 1 + len(MODELS)):
        holdouts = [parse(row[column].split(" / ")[1]) for row in rows[1:]]
        assert abs(np.mean(holdouts[:-1]) - holdouts[-1]) <= 1e-4


LOOSE_ENDS = {
    "a placeholder": r"\.\.\.",
    "None": r"\bNone\b",
    "nan": r"(?i)\bnan\b",
    "a range whose ends are equal": r"(?<![\w.\-])(\d+(?:\.\d+)?)\s*(?:–|-|to)\s*\1(?![\w.\-])",
    "a Keras auto-generated layer name": r"\b(?:conv2d|re_lu|group_normalization|max_pooling2d|global_(?:average|max)_pooling2d"
    r"|concatenate|dropout|dense|add|input_layer)_\d+\b",
}


def test_the_report_of_a_finished_promotion_has_no_loose_ends(tracked):
    from keras.src.utils.naming import to_snake_case  # how Keras names an unnamed layer: conv2d, conv2d_1, ...

    _, paths = tracked
    for path in (paths.methodology_md, paths.results_md):
        text = path.read_text()
        for what, pattern in LOOSE_ENDS.items():
            found = [text[max(0, m.start() - 60) : m.end() + 60] for m in re.finditer(pattern, text)]
            assert not found, f"{path.name} has {what}: {found}"
    layers = table_starting(markdown_tables(paths.methodology_md.read_text()), "Layers of the student")
    for name, kind, *_ in layers[1:]:
        assert not re.fullmatch(rf"{to_snake_case(kind)}(_\d+)?", name), f"student layer {name!r} ({kind}) has the name Keras made up"
    methods = paths.methodology_md.read_text()
    assert f"-e report --env-manager local -P model_name={MODEL} -P stage=Production`" in methods, "the command that made this report"
    latex = paths.methodology_tex.read_text()
    assert "-{}-env-manager" in latex and not re.search(r"\\texttt\{[^}]*--", latex), "'--' in code would print as an en dash"


def test_changing_a_logged_metric_changes_the_report(tracked):
    root, paths = tracked
    client = MlflowClient()
    run_id = resolve_version(MODEL, stage="Production").run_id
    original = client.get_run(run_id).data.metrics["holdout_student_f1"]
    client.log_metric(run_id, "holdout_student_f1", 0.1234)
    try:
        changed = write_report(MODEL, alias="champion", out_dir=root / "changed", resamples=RESAMPLES)
        holdout = table_starting(markdown_tables(changed.results_md.read_text()), "Hold-out test split")
        f1_row = next(row for row in holdout if row[0] == "F1")
        assert f1_row[1 + list(MODELS).index("student")].startswith("0.1234 [")
        assert '"f1": 0.1234' in changed.numbers.read_text()
    finally:
        client.log_metric(run_id, "holdout_student_f1", original)


def test_markdown_renders_and_latex_is_well_formed(tracked):
    _, paths = tracked
    import markdown_it  # pinned in the test extra: the Markdown must render

    for path in (paths.methodology_md, paths.results_md):
        text = path.read_text()
        tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(text)
        assert sum(t.type == "table_open" for t in tokens) == text.count("**Table"), f"{path.name}: every table parses as a table"
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
            assert (paths.folder / image).is_file(), image
    results = paths.results_md.read_text()
    for figure in ("confusion-matrices.png", "roc-curves.png", "pr-curves.png", "gradcam-holdout.png"):
        assert f"figures/{figure}" in results
    for path in (paths.methodology_tex, paths.results_tex, paths.latex):
        text = path.read_text()
        assert text.isascii(), f"{path.name}: non-ASCII characters (pdflatex without extra fonts chokes on some)"
        assert re.findall(r"\\begin\{(\w+)\}", text) and sorted(re.findall(r"\\begin\{(\w+)\}", text)) == sorted(
            re.findall(r"\\end\{(\w+)\}", text)
        ), path.name
        unescaped = re.sub(r"\\[{}]", "", text)
        assert unescaped.count("{") == unescaped.count("}"), f"{path.name}: unbalanced braces"
        prose = re.sub(r"\$[^$]*\$|\\begin\{equation\}.*?\\end\{equation\}|\\includegraphics\[[^]]*\]\{[^}]*\}", "", text, flags=re.S)
        assert not re.search(r"(?<!\\)[_%#]", prose), f"{path.name}: unescaped special character"


def test_latex_compiles(tracked, tmp_path):
    _, paths = tracked
    compiler = shutil.which("latexmk") or shutil.which("pdflatex")
    if compiler is None:
        pytest.skip("no TeX distribution (latexmk or pdflatex) on PATH; CI installs one where the time budget allows")
    build = tmp_path / "build"
    shutil.copytree(paths.folder, build)
    command = (
        [compiler, "-pdf", "-interaction=nonstopmode", "report.tex"]
        if compiler.endswith("latexmk")
        else [compiler, "-interaction=nonstopmode", "-halt-on-error", "report.tex"]
    )
    result = subprocess.run(command, cwd=build, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and (build / "report.pdf").is_file(), result.stdout[-3000:]


def test_report_is_logged_to_the_version_run(tracked):
    _, paths = tracked
    run_id = resolve_version(MODEL, stage="Production").run_id
    logged = {a.path for a in MlflowClient().list_artifacts(run_id, "report")}
    assert {
        "report/methodology.md",
        "report/results.md",
        "report/methodology.tex",
        "report/results.tex",
        "report/report.tex",
        "report/report.json",
    } <= logged
    figures = {a.path for a in MlflowClient().list_artifacts(run_id, "report/figures")}
    assert {"report/figures/confusion-matrices.png", "report/figures/roc-curves.png", "report/figures/gradcam-holdout.png"} <= figures


def test_mlflow_run_report_and_explain_cli(tracked, mri_subset, tmp_path):
    root, _ = tracked
    tracking_uri = mlflow.get_tracking_uri()
    env = child_env(MLFLOW_TRACKING_URI=tracking_uri)
    bin_dir = Path(sys.executable).parent
    out = tmp_path / "from-mlflow-run"
    result = subprocess.run(
        [
            str(bin_dir / "mlflow"),
            "run",
            str(ROOT),
            "-e",
            "report",
            "--env-manager",
            "local",
            "-P",
            f"model_name={MODEL}",
            "-P",
            "stage=Production",
            "-P",
            f"out_dir={out}",
            "-P",
            "resamples=50",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "methodology.md").is_file() and (out / "report.tex").is_file()

    scan = sorted((mri_subset / "yes").iterdir())[0]
    overlay = tmp_path / "overlay.png"
    result = subprocess.run(
        [sys.executable, "-m", "kd", "explain", "--model-name", MODEL, "--stage", "Production", str(scan), "--out", str(overlay)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert overlay.is_file() and overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "student: predicts" in result.stdout and "teacher: predicts" in result.stdout

    missing = subprocess.run(
        [sys.executable, "-m", "kd", "explain", "--model-name", MODEL, str(tmp_path / "nope.jpg")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_registered_models_explain_on_the_scan(tracked, mri_subset):
    from pipelines.data.images import decode_image
    from registry.explain import explain_scan, load_models

    models = load_models(MODEL, resolve_version(MODEL, alias="champion"))
    scan = decode_image(sorted((mri_subset / "no").iterdir())[0])
    for model in (models.student, *models.teachers.values()):
        explanation = explain_scan(model, scan, models.class_names)
        assert explanation.heatmap.shape == scan.shape
        assert 0.0 <= explanation.heatmap.min() and explanation.heatmap.max() <= 1.0


def test_report_of_unknown_model_fails_clearly(tracked):
    with pytest.raises(PipelineError, match="no registered model"):
        write_report("no-such-model", stage="Production")


def test_version_promoted_without_evidence_is_refused(tracked, tmp_path):
    client = MlflowClient()
    run_id = resolve_version(MODEL, stage="Production").run_id
    no_kd_run = client.get_run(run_id).data.tags[RunTag.NO_KD_CV_RUN_ID]
    client.delete_tag(run_id, RunTag.NO_KD_CV_RUN_ID)
    try:
        with pytest.raises(PipelineError, match="promoted before reports existed.*promote it again"):
            write_report(MODEL, stage="Production", out_dir=tmp_path)
    finally:
        client.set_tag(run_id, RunTag.NO_KD_CV_RUN_ID, no_kd_run)


def test_the_report_shows_the_comparison_on_its_data_or_the_one_named_and_no_other(tracked):
    from test_comparison_tables import FIGURES, build_comparison  # a comparison run as compare leaves it, with seeded scores

    root, paths = tracked
    assert "Comparison" not in paths.results_md.read_text(), "no comparison ran: no section"
    digest = resolve_version(MODEL, stage="Production").tags["data_digest"]
    elsewhere = build_comparison("elsewhere", digest="cd" * 32, seed=5)
    here = build_comparison("here", digest=digest, seed=6)
    try:
        found = write_report(MODEL, stage="Production", out_dir=root / "with-comparison", resamples=RESAMPLES)
        text = found.results_md.read_text()
        assert "\n## Comparison\n" in text and f"run {here}" in text and elsewhere not in text
        assert json.loads(found.numbers.read_text())["comparison"]["run_id"] == here
        assert all((found.folder / "figures" / f"comparison-{name}").is_file() for name in FIGURES.values())
        assert "\\section{Comparison}" in found.results_tex.read_text() and found.results_tex.read_text().isascii()
        named = write_report(MODEL, stage="Production", out_dir=root / "named-comparison", resamples=RESAMPLES, comparison="elsewhere")
        assert f"run {elsewhere}" in named.results_md.read_text() and here not in named.results_md.read_text()
    finally:
        for run_id in (elsewhere, here):  # later tests' reports are of a store without comparisons
            MlflowClient().delete_run(run_id)


def test_the_calibration_table_equals_the_logged_metrics_and_the_model_card_is_linked(tracked):
    _, paths = tracked
    metrics = runs_of_report(paths)["promote"].data.metrics
    results = paths.results_md.read_text()
    rows = table_starting(markdown_tables(results), "Calibration on the hold-out split")
    assert rows[0][:3] == ["model", "temperature", "ECE as trained"]
    assert_calibration_table(rows, metrics)
    assert "figures/reliability.png" in results and (paths.folder / "figures" / "reliability.png").stat().st_size > 1000
    card = (paths.folder / "model_card.md").read_text()
    assert "model_card.md" in results and card.startswith(f"# Model card: {MODEL} v")
