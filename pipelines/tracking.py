"""MLflow bookkeeping shared by every step: one run per step, reuse of finished runs, data lineage."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Iterator

import mlflow
from mlflow.entities import Run

from pipelines.config import Config
from pipelines.data import Dataset, Splits

STEP_TAG, OUTCOME_TAG, DIGEST_TAG, PARAMS_TAG = "kd.step", "kd.outcome", "kd.data_digest", "kd.params"


def step_key(cfg: Config, names: tuple[str, ...]) -> str:
    """Canonical JSON of the parameters that decide a step's result (typed, so 5 and 5.0 agree)."""
    return json.dumps({name: getattr(cfg, name) for name in sorted(names)}, sort_keys=True)


def find_finished_run(step: str, digest: str, key: str) -> Run | None:
    """The newest run of ``step`` that trained to the end on the same data with the same parameters.

    Runs that only pointed at another run (``outcome = reused``), failed or were killed never match.
    All experiments are searched: ``mlflow run`` without an experiment name logs to ``Default``.
    """
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{STEP_TAG}` = '{step}' and tags.`{OUTCOME_TAG}` = 'trained' and tags.`{DIGEST_TAG}` = '{digest}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return next((run for run in runs if run.data.tags.get(PARAMS_TAG) == key), None)


def reuse_finished(step: str, cfg: Config, names: tuple[str, ...], digest: str, nested: bool) -> str | None:
    """The id of a finished run of ``step`` on the same data with the same parameters, or None.

    Under ``mlflow run`` (not nested) a run already exists for this step: it is tagged with the run it
    stands for and ends FINISHED, so the user sees why nothing trained.
    """
    previous = find_finished_run(step, digest, step_key(cfg, names))
    if previous is None:
        return None
    print(f"{step}: reusing finished run {previous.info.run_id} (same data digest and parameters)")
    if not nested and os.environ.get("MLFLOW_RUN_ID"):
        with mlflow.start_run():
            mlflow.set_tags({STEP_TAG: step, OUTCOME_TAG: "reused", "kd.reused_run_id": previous.info.run_id})
    return previous.info.run_id


@contextmanager
def step_run(step: str, cfg: Config, names: tuple[str, ...], dataset: Dataset, splits: Splits, nested: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Start (or, under ``mlflow run``, resume) the step's run with its tags, params and data lineage.

    An exception inside marks the run FAILED (MLflow's context manager does that) and propagates.
    """
    if mlflow.active_run() is None and not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(cfg.experiment_name)
    with mlflow.start_run(nested=nested, run_name=step if nested else None) as run:
        already = mlflow.get_run(run.info.run_id).data.params  # `mlflow run` logs the MLproject params itself
        mlflow.log_params({k: v for k, v in cfg.as_params(names + ("data_dir",)).items() if k not in already})
        mlflow.set_tags({STEP_TAG: step, DIGEST_TAG: dataset.digest, PARAMS_TAG: step_key(cfg, names), OUTCOME_TAG: "running"})
        log_data(dataset, splits)
        yield run
        mlflow.set_tag(OUTCOME_TAG, "trained")


def log_data(dataset: Dataset, splits: Splits) -> None:
    """The manifest as an MLflow dataset input (digest included), and the split assignment as a table."""
    table = splits.table(dataset)
    source = mlflow.data.from_pandas(
        table, source=str(dataset.root), targets="label", name=f"{dataset.source}:{dataset.root.name}", digest=dataset.digest[:32]
    )
    mlflow.log_input(source, context="training")
    mlflow.log_text(table.to_csv(index=False), "data/splits.csv")
    counts = table.groupby(["split", "label"]).size().unstack(fill_value=0)
    mlflow.log_text(counts.to_string(), "data/split_counts.txt")
    mlflow.log_params({"data_source": dataset.source, "classes": ",".join(dataset.class_names), "positive": dataset.positive_class or "macro", "n_images": len(table)})
