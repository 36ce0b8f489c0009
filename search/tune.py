"""Step ``search``: Optuna over temperature, alpha, student size, learning rate (and teacher, of several), scored by k-fold F1.

Any number of workers, on any machines, share one study in an RDB storage (SQLite file, PostgreSQL for
several machines) and one MLflow tracking store. ``n_trials`` is the study's total of finished
(complete + pruned) trials, not a per-worker count; with a budget (``max_params``, ``max_latency_ms``), of
students within it: one over it is skipped before training. A killed worker's trial stops sending heartbeats,
is marked failed after the grace period and retried with the same parameters.

This module is the worker (:func:`run_search`); the study (``search.study``), the trial's objective
(``search.objective``) and the summary (``search.summary``) have their own.
"""

from __future__ import annotations

import time
import uuid

import mlflow
import optuna
from optuna.trial import TrialState

from pipelines.config import SEARCH_PARAMS, Config, PipelineError, redact_url
from pipelines.log import logger
from pipelines.names import RunTag
from pipelines.steps.prepare import Prepared, prepare_data
from pipelines.tracking.runs import close_stale_runs, log_data, tracked_run
from search.objective import OVER_BUDGET_PER_TRIAL, SurplusTrial, check_budget, make_objective, teacher_finder
from search.space import SearchSpace
from search.study import DIGEST_ATTR, budget_text, load_or_create_study, open_storage, parent_run_id, state_counts
from search.summary import log_summary


def run_search(cfg: Config, under: str | None = None, prepared: Prepared | None = None, launched_run_id: str | None = None) -> optuna.Study:
    """Join or create the study, make sure the teachers exist, then work until it has ``n_trials`` finished trials.

    ``under``: the id of a pipeline run the study's MLflow run is nested in (``main``); ``prepared``: its data;
    ``launched_run_id``: the run ``mlflow run`` started for this worker (see :func:`search.study.parent_run_id`).
    """
    space = SearchSpace.from_config(cfg)
    check_budget(cfg, space)
    storage = open_storage(cfg)
    study, cfg = load_or_create_study(cfg, storage)
    prepared = prepare_data(cfg, reuse=prepared)
    digest = study.user_attrs.get(DIGEST_ATTR)
    if digest is None:
        study.set_user_attr(DIGEST_ATTR, prepared.dataset.digest)
    elif digest != prepared.dataset.digest:
        raise PipelineError(
            f"data at {cfg.data_dir or 'the embedded set'} (digest {prepared.dataset.digest[:12]}) differs from "
            f"study {cfg.study_name!r}'s data (digest {digest[:12]})"
        )

    close_stale_runs()
    parent = parent_run_id(study, cfg, under, launched_run_id)
    # Trial and teacher runs nest under the parent, so they belong in its experiment whoever created it.
    mlflow.set_experiment(experiment_id=mlflow.get_run(parent).info.experiment_id)
    worker = uuid.uuid4().hex[:8]
    with tracked_run(cfg, run_id=parent):
        mlflow.set_tags(
            {
                RunTag.STEP: "search",
                "optuna.study": cfg.study_name,
                "optuna.storage": redact_url(cfg.storage_url),
                RunTag.DATA_DIGEST: prepared.dataset.digest,
            }
        )
        if not mlflow.get_run(parent).data.params.get("study_name"):
            mlflow.log_params({**cfg.as_params(SEARCH_PARAMS), "data_dir": cfg.data_dir})
            log_data(prepared.dataset, prepared.splits)
        # One worker trains the teachers while the others wait, then finds them in the tracking store. Among several
        # teachers, each is trained when a trial first chooses it.
        teacher_run = teacher_finder(prepared)
        if len(space.teachers) == 1:
            mlflow.set_tag(RunTag.TEACHER_RUN_ID, teacher_run(cfg))

        objective = make_objective(cfg, space, prepared, teacher_run)
        while True:
            optuna.storages.fail_stale_trials(study)
            counts, over = state_counts(study)
            finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
            if finished >= cfg.n_trials:
                break
            if over >= OVER_BUDGET_PER_TRIAL * cfg.n_trials:  # the budget fits too few of the ranges' students to find n_trials
                raise PipelineError(
                    f"study {cfg.study_name!r}: {over} proposed students were over the budget ({budget_text(vars(cfg))}), "
                    f"{finished} within it; "
                    "narrow width_range / depth_range to students that fit, or raise the budget"
                )
            if finished + counts[TrialState.RUNNING] >= cfg.n_trials and counts[TrialState.WAITING] == 0:
                time.sleep(min(5, cfg.heartbeat_interval))  # the last trials are running elsewhere; wait or retry them if they die
                continue
            study.optimize(objective, n_trials=1, catch=(SurplusTrial,), gc_after_trial=True)
        logger("search").info(f"worker {worker} done; study {cfg.study_name!r} has {finished} finished trials")
        log_summary(study, cfg)
    return study
