"""MLflow bookkeeping shared by every step: one run per step, reuse of finished runs, data lineage."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
import requests
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from pipelines.config import Config, PipelineError, redact_url
from pipelines.data.sources import Dataset
from pipelines.data.splits import Splits
from pipelines.fingerprint import code_fingerprint
from pipelines.log import logger
from pipelines.names import RunTag


class TrackingUnreachable(PipelineError):
    """The tracking server did not answer, even after MLflow's retries with backoff."""


def unreachable(error: BaseException) -> bool:
    """An MLflow client error that means the server is away: refused, timed out, 5xx until retries ran out, or the
    connection cut off in the middle of an answer (a server killed after sending the headers, which no retry covers)."""
    if not isinstance(error, MlflowException) or "API request to" not in str(error):
        return False
    # MLflow wraps what requests raised in a new MlflowException, keeping it only as the implicit context.
    cut_off = isinstance(error.__context__, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError))
    return cut_off or "Max retries exceeded" in str(error) or "timeout exception" in str(error)


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), None if gone.

    A pid alone can be reused by a later process; pid plus start time names one process for good.
    """
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    """Which process owns a run, so a later start can tell a live run from one whose process died."""
    return {RunTag.HOST: socket.gethostname(), RunTag.PROCESS: f"{os.getpid()}:{_start_ticks(os.getpid())}"}


def close_stale_runs() -> list[str]:
    """Close the runs a process of this host left RUNNING when it died (kill -9, OOM killer): KILLED, with the reason.

    Runs owned by live processes, by other hosts or by no known process (``mlflow run``'s own run) are left alone.
    """
    host = socket.gethostname()
    client = mlflow.MlflowClient()
    stale = [
        run
        for run in mlflow.search_runs(
            search_all_experiments=True,
            filter_string=f"attributes.status = 'RUNNING' and tags.`{RunTag.HOST}` = '{host}'",
            output_format="list",
        )
        if not _process_alive(run.data.tags.get(RunTag.PROCESS, ""))
    ]
    for run in stale:
        pid = run.data.tags[RunTag.PROCESS].split(":")[0]
        client.set_tag(run.info.run_id, RunTag.FAILURE, f"process {pid} on {host} died while the run was RUNNING; closed by a later start")
        client.set_terminated(run.info.run_id, "KILLED")
        logger("tracking").warning(
            f"run {run.info.run_id} ({run.data.tags.get(RunTag.STEP, 'run')}) was left RUNNING by dead process {pid}; marked KILLED"
        )
    return [run.info.run_id for run in stale]


def _process_alive(process: str) -> bool:
    pid, _, ticks = process.partition(":")
    return not pid.isdigit() or _start_ticks(int(pid)) == ticks


def close_run(run_id: str, status: str, reason: str, wait_s: float) -> bool:
    """End a run with ``status`` and the reason; if the tracking server is away, keep trying for ``wait_s``.

    Returns False when the server never came back (the next start on this host closes the run instead).
    """
    client = mlflow.MlflowClient()
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        try:
            client.set_tag(run_id, RunTag.FAILURE, reason[:4000])
            client.set_terminated(run_id, status)
            return True
        except MlflowException as error:
            if not unreachable(error) or time.monotonic() > deadline:
                return False
            if not announced:
                logger("tracking").warning(
                    f"server {mlflow.get_tracking_uri()} unreachable; waiting up to {wait_s:.0f} s to mark run {run_id} {status}"
                )
                announced = True
            time.sleep(2)


@contextmanager
def tracked_run(
    cfg: Config, finished_on: tuple[type[BaseException], ...] = (), step: str = "", **start_run: object
) -> Iterator[mlflow.ActiveRun]:
    """``mlflow.start_run`` that never leaves its run RUNNING: an exception ends it FAILED (KILLED on Ctrl-C)
    with the reason in ``kd.failure``, waiting for an absent tracking server; ``finished_on`` exceptions
    (a pruned trial) end it FINISHED. The run is tagged with its process (see ``close_stale_runs``) and the
    fingerprint of the code it ran (``kd.code_fingerprint``: ``step``'s code, see :func:`code_fingerprint`)."""
    # The process tags come with the new run, not after it: a process killed in between would leave a RUNNING run
    # that names no process, which close_stale_runs could never close.
    tags = {**(start_run.pop("tags", None) or {}), **process_tags(), RunTag.CODE: code_fingerprint(step)}
    run = mlflow.start_run(tags=tags, **start_run)
    run_id = run.info.run_id
    try:
        yield run
    except finished_on:
        mlflow.end_run()
        raise
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        try:
            mlflow.end_run(status)  # pops the run first, so a failure to reach the server leaves the stack right
        except MlflowException:
            pass
        closed = close_run(run_id, status, redact_url(f"{type(error).__name__}: {error}"), cfg.tracking_wait_s)
        if unreachable(error):
            outcome = f"marked {status} once it was back" if closed else "left RUNNING: the next start on this host closes it"
            raise TrackingUnreachable(
                f"tracking server {mlflow.get_tracking_uri()} unreachable even after retries ({str(error)[:300]}); run {run_id} {outcome}"
            ) from error
        raise
    mlflow.end_run()


def step_key(cfg: Config, names: tuple[str, ...]) -> str:
    """Canonical JSON of the parameters that decide a step's result (typed, so 5 and 5.0 agree)."""
    return json.dumps({name: getattr(cfg, name) for name in sorted(names)}, sort_keys=True)


def find_finished_run(step: str, digest: str, key: str, fingerprint: str) -> Run | None:
    """The newest run of ``step`` that trained to the end on the same data with the same parameters and code
    (``fingerprint``: see :mod:`pipelines.fingerprint`).

    Runs that only pointed at another run (``outcome = reused``), failed or were killed never match.
    """
    return newest_matching_run(step, digest, key, fingerprint, f"tags.`{RunTag.OUTCOME}` = 'trained' and attributes.status = 'FINISHED'")


def newest_matching_run(step: str, digest: str, key: str, fingerprint: str, also: str = "") -> Run | None:
    """The newest run of ``step`` on the same data (digest), parameters (``key``, :func:`step_key`) and code, whatever its
    status, that also satisfies the MLflow filter ``also``. All experiments are searched: ``mlflow run`` without an
    experiment name logs to ``Default``."""
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{RunTag.STEP}` = '{step}' and tags.`{RunTag.DATA_DIGEST}` = '{digest}' "
        f"and tags.`{RunTag.CODE}` = '{fingerprint}'" + (f" and {also}" if also else ""),
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return next((run for run in runs if run.data.tags.get(RunTag.PARAMS) == key), None)


def reuse_finished(
    step: str, cfg: Config, names: tuple[str, ...], digest: str, nested: bool, launched_run_id: str | None = None
) -> str | None:
    """The id of a finished run of ``step`` on the same data with the same parameters and code, or None.

    ``launched_run_id``: the run ``mlflow run`` started for this step (see :func:`kd.cli.run_command`): when not
    nested, it is tagged with the run it stands for and ends FINISHED, so the user sees why nothing trained.
    """
    previous = find_finished_run(step, digest, step_key(cfg, names), code_fingerprint(step))
    if previous is None:
        return None
    logger().info(f"{step}: reusing finished run {previous.info.run_id} (same data digest, parameters and code fingerprint)")
    if not nested and launched_run_id:
        with mlflow.start_run(run_id=launched_run_id):
            mlflow.set_tags(
                {
                    RunTag.STEP: step,
                    RunTag.OUTCOME: "reused",
                    RunTag.REUSED_RUN_ID: previous.info.run_id,
                    RunTag.CODE: code_fingerprint(step),
                }
            )
    return previous.info.run_id


@contextmanager
def step_run(
    step: str,
    cfg: Config,
    names: tuple[str, ...],
    dataset: Dataset,
    splits: Splits,
    nested: bool = False,
    launched_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start the step's run (nested in the active run, or ``launched_run_id``, the run ``mlflow run`` started for it,
    resumed) with its tags, params and data lineage.

    An exception inside marks the run FAILED (see ``tracked_run``) and propagates.
    """
    resumed = None if nested else launched_run_id
    if mlflow.active_run() is None and resumed is None:  # a launched run is in the experiment `mlflow run` chose
        mlflow.set_experiment(cfg.experiment_name)
    close_stale_runs()
    # Named after its step however it starts (nested, `kd <step>` alone, `mlflow run`), never a made-up name.
    with tracked_run(cfg, step=step, nested=nested, run_name=step, run_id=resumed) as run:
        already = mlflow.get_run(run.info.run_id).data.params  # `mlflow run` logs the MLproject params itself
        mlflow.log_params({k: v for k, v in cfg.as_params(names + ("data_dir",)).items() if k not in already})
        mlflow.set_tags(
            {RunTag.STEP: step, RunTag.DATA_DIGEST: dataset.digest, RunTag.PARAMS: step_key(cfg, names), RunTag.OUTCOME: "running"}
        )
        log_data(dataset, splits)
        yield run
        mlflow.set_tag(RunTag.OUTCOME, "trained")


def local_source(path) -> mlflow.data.dataset_source.DatasetSource:
    """The data folder as MLflow's local-file dataset source, chosen explicitly: MLflow registers that class for two
    URI schemes, so a plain path string is resolved with a warning that it "can be interpreted in multiple ways"."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    local = next(source for source in get_registered_sources() if source._get_source_type() == "local")
    return local(str(path))


def name_launched_run(run_id: str) -> None:
    """Name the run ``mlflow run`` started after its entry point (``promote``, ``report``) when MLflow made the name up
    (``persistent-croc-697``), first thing, so even a run that fails at once says what it was."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
        entry_point = run.data.tags.get("mlflow.project.entryPoint")
        if entry_point and re.fullmatch(r"[a-z]+-[a-z]+-\d{1,4}", run.info.run_name or ""):
            mlflow.MlflowClient().set_tag(run_id, "mlflow.runName", entry_point)
    except MlflowException:  # a name is cosmetic: an absent server is the step's to report, with its waits and retries
        return


def log_data(dataset: Dataset, splits: Splits) -> None:
    """The manifest as an MLflow dataset input (digest included), and the split assignment as a table."""
    table = splits.table(dataset)
    source = mlflow.data.from_pandas(
        table, source=local_source(dataset.root), targets="label", name=f"{dataset.source}:{dataset.root.name}", digest=dataset.digest[:32]
    )
    try:
        mlflow.log_input(source, context="training")
    except MlflowException as error:
        # Runs started together on the same data: MLflow's SQL store looks the dataset up, then inserts it, so the
        # second of two simultaneous inserts breaks the unique key (seen in tests/test_pipeline_e2e.py). By now the
        # other run has stored it: logging again finds it and only links it to this run.
        if "datasets" not in str(error) or not any(text in str(error) for text in ("UNIQUE constraint", "duplicate key")):
            raise
        mlflow.log_input(source, context="training")
    mlflow.log_text(table.to_csv(index=False), "data/splits.csv")
    counts = table.groupby(["split", "label"]).size().unstack(fill_value=0)
    mlflow.log_text(counts.to_string(), "data/split_counts.txt")
    mlflow.log_params(
        {
            "data_source": dataset.source,
            "classes": ",".join(dataset.class_names),
            "positive": dataset.positive_class or "macro",
            "n_images": len(table),
        }
    )
    if splits.duplicates is not None:  # a given hold-out split, checked against the training images
        mlflow.log_metric("holdout_duplicates", len(splits.duplicates))
        mlflow.log_text(splits.duplicates.to_csv(index=False), "data/holdout_duplicates.csv")
