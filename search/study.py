"""The study a search's workers share: its RDB storage (checked before any training), its creation with the sampler,
pruner, settings and anchor trials under a lock, a dead worker's trial retried, the MLflow parent run, and which
finished trial is best."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import mlflow
import numpy as np
import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from pipelines.config import SEARCH_PARAMS, Config, PipelineError, redact_url
from pipelines.log import logger
from pipelines.names import Metric, RunTag
from pipelines.tracking.locks import database_lock
from search.space import SearchSpace

# fail_stale_trials and the matplotlib plots are marked experimental; they are what we need.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


STUDY_CONFIG_ATTR, PARENT_RUN_ATTR, DIGEST_ATTR = "config", "mlflow_parent_run_id", "data_digest"


SAMPLER_ATTR, PRUNER_ATTR = "sampler", "pruner"


# The pruner: no pruning before two trials have finished, nor on a trial's first fold.
PRUNER_SETTINGS = {"n_startup_trials": 2, "n_warmup_steps": 1}


def sampler_settings(cfg: Config) -> dict:
    """TPE's settings: a third of the trials (2 to 10) sampled at random before TPE models the others, univariate."""
    return {"n_startup_trials": max(2, min(10, cfg.n_trials // 3)), "multivariate": False}


# Settings a joining worker takes from the study, so every trial trains on the same data the same way.
SHARED_FIELDS = tuple(name for name in SEARCH_PARAMS if name not in ("n_trials", "study_name")) + (
    "data_dir",
    "synthetic_images",
    "synthetic_classes",
)


def open_storage(cfg: Config) -> RDBStorage:
    """The study's RDB storage, checked before any training: known scheme, reachable database."""
    if cfg.storage_url == mlflow.get_tracking_uri():
        raise PipelineError(
            "storage is the MLflow tracking database; Optuna and MLflow both keep an alembic_version table, so give them separate databases"
        )
    scheme = cfg.storage_url.split(":", 1)[0].split("+", 1)[0]
    if scheme not in ("sqlite", "postgresql", "mysql"):
        raise PipelineError(f"storage: unknown URL scheme {scheme!r}; use sqlite:///path.db or postgresql://user@host/db")
    engine_kwargs = {"connect_args": {"timeout": 60}} if scheme == "sqlite" else {"pool_pre_ping": True}
    try:
        engine = sqlalchemy.create_engine(cfg.storage_url, **engine_kwargs)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as error:  # any driver's connection error: report it in one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PipelineError(
            f"storage={redact_url(cfg.storage_url)}: cannot connect ({reason}); check the URL and that the database server runs"
        ) from None
    # Workers starting together on an empty database would race to create the Optuna and MLflow schemas.
    with storage_lock(cfg, "schema"):
        storage = RDBStorage(
            cfg.storage_url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=cfg.heartbeat_interval,
            grace_period=cfg.grace_period,
            heartbeat_stale_trial_callback=retry_dead_trial,
        )
        mlflow.MlflowClient().search_experiments(max_results=1)
    return storage


_retry = RetryHeartbeatStaleTrialCallback(max_retry=2)


def retry_dead_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker died: close its MLflow run as KILLED (never left RUNNING) and queue a retry."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        client = mlflow.MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "optuna.state", "FAIL")
            client.set_tag(run_id, RunTag.FAILURE, "worker stopped sending heartbeats; trial retried")
            client.set_terminated(run_id, "KILLED")
    _retry(study, trial)


def storage_lock(cfg: Config, name: str):
    """A lock every worker of the study honours (see ``database_lock``)."""
    return database_lock(cfg.storage_url, f"{cfg.study_name}:{name}")


def directions(cfg: Config) -> list[str]:
    return ["maximize"] if cfg.objectives == "f1" else ["maximize", "minimize"]


def load_or_create_study(cfg: Config, storage: RDBStorage) -> tuple[optuna.Study, Config]:
    """Create the study, or join it: a joining worker takes the data and settings the study was created with.

    The creating worker queues the study's first two trials (``SearchSpace.anchors``: the no-KD baseline and the
    published setting), so the best trial is never worse than those. Creation is under the study's storage lock:
    workers starting together create the study, record its settings and queue those trials once.
    """
    wanted = [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE for d in directions(cfg)]
    with storage_lock(cfg, "create"):
        try:
            study_id = storage.get_study_id_from_name(cfg.study_name)
        except KeyError:
            study_id = None
        if study_id is not None and storage.get_study_directions(study_id) != wanted:
            have = [d.name.lower() for d in storage.get_study_directions(study_id)]
            raise PipelineError(
                f"study {cfg.study_name!r} exists with directions {have}, not {directions(cfg)}; "
                "use another study_name or the same objectives"
            )
        # The creating worker is seeded, so a single-worker study is reproducible; a joining worker with the
        # same seed would propose the very same parameters, so it draws its own.
        seed = cfg.seed if study_id is None else int.from_bytes(os.urandom(4), "big")
        sampling = sampler_settings(cfg)
        sampler = optuna.samplers.TPESampler(seed=seed, **sampling)
        pruner = optuna.pruners.MedianPruner(**PRUNER_SETTINGS)
        study = optuna.create_study(
            study_name=cfg.study_name, storage=storage, directions=directions(cfg), sampler=sampler, pruner=pruner, load_if_exists=True
        )
        stored = study.user_attrs.get(STUDY_CONFIG_ATTR)
        if stored is None:
            study.set_metric_names(cfg.objectives.split(","))  # optuna-dashboard's labels: "f1", not "Objective 0"
            study.set_user_attr(STUDY_CONFIG_ATTR, {name: getattr(cfg, name) for name in SHARED_FIELDS})
            # How the sampler and pruner were built, for the report (Optuna keeps them in private attributes only).
            study.set_user_attr(SAMPLER_ATTR, {"type": type(sampler).__name__, **sampling})
            study.set_user_attr(PRUNER_ATTR, {"type": type(pruner).__name__, **PRUNER_SETTINGS})
            # No more than n_trials: a queued trial beyond them would wait in the study for ever.
            for params in SearchSpace.from_config(cfg).anchors(cfg)[: cfg.n_trials]:
                study.enqueue_trial(params)
            return study, cfg
    joined = cfg.replace(**{name: value for name, value in stored.items() if name in SHARED_FIELDS})
    changed = sorted(name for name in SHARED_FIELDS if getattr(joined, name) != getattr(cfg, name))
    if changed:
        logger("search").info(f"joining study {cfg.study_name!r} with its own settings for {', '.join(changed)}")
    return study, joined


def open_study(cfg: Config) -> tuple[optuna.Study, Config]:
    """An existing study and the Config it was created with (its data and settings); never creates one."""
    storage = open_storage(cfg)
    try:
        storage.get_study_id_from_name(cfg.study_name)
    except KeyError:
        raise PipelineError(f"no study {cfg.study_name!r} in {cfg.storage_url.split('@')[-1]}; run the search first") from None
    return load_or_create_study(cfg, storage)


def parent_run_id(study: optuna.Study, cfg: Config, under: str | None = None, launched_run_id: str | None = None) -> str:
    """The study's one MLflow parent run: the first worker creates it, or makes ``launched_run_id`` (the run
    ``mlflow run`` started for it) the parent; a joining worker's launched run is tagged with the parent it joined.

    ``under``: a pipeline run (``main``) the study's run is shown nested in.
    """
    with storage_lock(cfg, "parent"):
        attrs = study.user_attrs  # read from the storage afresh, under the lock
        if PARENT_RUN_ATTR in attrs:
            if launched_run_id:  # `mlflow run` of a joining worker: say where its trials go
                mlflow.MlflowClient().set_tag(launched_run_id, RunTag.SEARCH_PARENT_RUN_ID, attrs[PARENT_RUN_ATTR])
            return attrs[PARENT_RUN_ATTR]
        if launched_run_id:
            run_id = launched_run_id
        else:
            # Nested in a pipeline run: its experiment; else the configured one.
            experiment_id = mlflow.get_run(under).info.experiment_id if under else mlflow.set_experiment(cfg.experiment_name).experiment_id
            tags = {"mlflow.parentRunId": under} if under else None
            run_id = mlflow.MlflowClient().create_run(experiment_id, run_name=f"search-{cfg.study_name}", tags=tags).info.run_id
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        return run_id


def within_budget(trial: optuna.trial.FrozenTrial | optuna.Trial) -> bool:
    """Whether the trial's student fits the study's budgets: Optuna's rule, every constraint value at most 0 (none: no budget)."""
    return all(value <= 0 for value in trial.constraints.values())


def state_counts(study: optuna.Study) -> tuple[dict[TrialState, int], int]:
    """The trials within the budget per state, and the number over it (skipped before training)."""
    counts = {state: 0 for state in TrialState}
    over = 0
    for trial in study.get_trials(deepcopy=False):
        if within_budget(trial):
            counts[trial.state] += 1
        else:
            over += 1
    return counts, over


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The single best trial within the study's budget: highest mean F1; on a tie (or on the Pareto front) the smaller student.

    Only complete trials within the budget are candidates (Optuna's own ``best_trials`` keeps to them as well once
    a trial has constraints): the promoted student always fits.
    """
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and within_budget(t)]
    if not complete:
        over = [t for t in trials if not within_budget(t)]
        if over:
            budget = budget_text(study.user_attrs.get(STUDY_CONFIG_ATTR, {}))
            raise PipelineError(
                f"study {study.study_name!r} has no complete trial within its budget ({budget}): its {len(over)} trials so far were "
                "students over it, skipped before training; run the search on, or start a new study (another study_name) with a "
                "larger max_params / max_latency_ms or smaller width_range / depth_range"
            )
        raise PipelineError(f"study {study.study_name!r} has no complete trial yet; run the search first")
    candidates = study.best_trials if len(study.directions) > 1 else complete
    return max(candidates, key=lambda t: (round(t.values[0], 6), -t.user_attrs.get("student_params", np.inf)))


# The budgets (Config fields, 0 = no limit), each an Optuna constraint of that name, and the measure it limits.
BUDGETS = {"max_params": Metric.STUDENT_PARAMS, "max_latency_ms": Metric.LATENCY_MS}


def budget_text(settings: Mapping[str, float]) -> str:
    """The budgets set among ``settings`` (a Config's fields or a study's stored settings): ``max_params=34000``."""
    return ", ".join(f"{name}={settings[name]:g}" for name in BUDGETS if settings.get(name))
