"""The reporting package, and step ``report``: the methodology and results sections of a paper, written from the
tracked runs. Three stages, each in its modules:

- gather (all MLflow, registry, study and file reads): :mod:`.gather` (a version's runs, study and artifacts; a
  comparison and its cell runs);
- analyse: :mod:`.stats` (hold-out and k-fold statistics, the comparison's tables);
- render: :mod:`.methods` (with :mod:`.methods_data`, :mod:`.methods_model`), :mod:`.results`, :mod:`.comparison`,
  :mod:`.trust`, :mod:`.figures`, all written with :mod:`.document` (one list of blocks, Markdown and LaTeX).

For a registered version (by stage or alias) it writes ``methodology.{md,tex}``, ``results.{md,tex}``, a standalone
``report.tex``, ``report.json`` (every number used) and ``figures/`` into a folder, then logs the folder as artifacts
(``report/``) of the version's run. When a KD comparison ran on the version's data, its tables and figures close the
results. Every number comes from the tracking store, the registry, the study or the stored artifacts (models, data
manifest, hold-out predictions); none is typed in. What the report reads is logged by ``promote``
(``registry.evidence``); the report trains nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from pipelines.config import PROJECT_ROOT
from pipelines.log import logger
from pipelines.names import RunTag
from registry.report.document import Table, latex_document, to_latex, to_markdown
from registry.report.gather import gather
from registry.report.methods import methodology
from registry.report.results import results
from registry.report.stats import BOOTSTRAP_RESAMPLES

__all__ = ["BOOTSTRAP_RESAMPLES", "ReportPaths", "write_report"]


@dataclass(frozen=True)
class ReportPaths:
    folder: Path
    methodology_md: Path
    results_md: Path
    methodology_tex: Path
    results_tex: Path
    latex: Path  # standalone report.tex
    numbers: Path  # report.json


def write_report(
    model_name: str,
    stage: str | None = None,
    alias: str | None = None,
    out_dir: Path | str | None = None,
    storage: str = "",
    resamples: int = BOOTSTRAP_RESAMPLES,
    comparison: str = "",
    launched_run_id: str | None = None,
) -> ReportPaths:
    """Write the methodology and results (Markdown and LaTeX) of a registered version and log them to its run;
    ``launched_run_id``, the run ``mlflow run . -e report`` started, is tagged with what it produced.

    ``out_dir`` defaults to ``reports/<model>-v<version>``; ``storage`` overrides the Optuna storage recorded by the search.
    The results end with a section "Comparison" when a finished KD comparison ran on the version's data (same data
    digest), or when ``comparison`` names one (run id or comparison name).
    """
    if stage is None and alias is None:
        stage = "Production"
    s = gather(model_name, stage, alias, storage, comparison)
    folder = Path(out_dir) if out_dir else PROJECT_ROOT / "reports" / f"{model_name}-v{s.version.version}"
    folder.mkdir(parents=True, exist_ok=True)
    method_blocks = methodology(s, resamples)
    result_blocks, numbers = results(s, folder, resamples)
    first_table = 1 + sum(1 for block in method_blocks if isinstance(block, Table))  # tables are numbered across both sections
    paths = ReportPaths(
        folder,
        folder / "methodology.md",
        folder / "results.md",
        folder / "methodology.tex",
        folder / "results.tex",
        folder / "report.tex",
        folder / "report.json",
    )
    paths.methodology_md.write_text(to_markdown(method_blocks))
    paths.results_md.write_text(to_markdown(result_blocks, first_table=first_table))
    paths.methodology_tex.write_text(to_latex(method_blocks))
    paths.results_tex.write_text(to_latex(result_blocks))
    paths.latex.write_text(latex_document(f"{model_name} v{s.version.version}: methods and results", ["methodology", "results"]))
    paths.numbers.write_text(json.dumps(numbers, indent=2, default=float))
    MlflowClient().log_artifacts(s.version.run_id, str(folder), "report")
    if launched_run_id:  # under `mlflow run . -e report`: say what this run produced
        # Nested under the version's promote run (shown so in the UI when both are in one experiment, as the README's commands keep them).
        for key, value in {
            RunTag.STEP: "report",
            RunTag.REPORT_OF: f"{model_name} v{s.version.version}",
            RunTag.REPORT_RUN_ID: s.version.run_id,
            "mlflow.parentRunId": s.version.run_id,
        }.items():
            MlflowClient().set_tag(launched_run_id, key, value)
    logger("report").info(f"{model_name} v{s.version.version} -> {folder} (also logged to run {s.version.run_id} under report/)")
    return paths
