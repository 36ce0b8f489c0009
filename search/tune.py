"""Step ``search``: Optuna over temperature, alpha, student size, learning rate (and teacher, of several), scored by k-fold F1.

Any number of workers, on any machines, share one study in an RDB storage (SQLite file, PostgreSQL for
several machines) and one MLflow tracking store. ``n_trials`` is the study's total of finished
(complete + pruned) trials, not a per-worker count; with a budget (``max_params``, ``max_latency_ms``), of
students within it: one over it is skipped before training. A killed worker's trial stops sending heartbeats,
is marked failed after the grace period and retried with the same parameters.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import mlflow
import numpy as np
import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from pipelines.config import SEARCH_PARAMS, Config, PipelineError, redact_url
from pipelines.evaluation.calibration import log_oof_logits
from pipelines.evaluation.latency import keras_latency
from pipelines.evaluation.metrics import CONFUSION_ARTIFACT, confusion_record, pyplot
from pipelines.models.builders import build_student
from pipelines.names import Metric, RunTag
from pipelines.steps.distill import cross_validate_student
from pipelines.steps.prepare import Prepared, prepare_data
from pipelines.steps.teacher import train_teacher
from pipelines.tracking.locks import database_lock, teacher_lock
from pipelines.tracking.runs import close_stale_runs, log_data, tracked_run
from search.space import SearchSpace, teacher_config

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
# The budgets (Config fields, 0 = no limit), each an Optuna constraint of that name, and the measure it limits.
BUDGETS = {"max_params": Metric.STUDENT_PARAMS, "max_latency_ms": Metric.LATENCY_MS}
# A study whose sampler proposed this many students over the budget per trial asked for stops: the budget hardly fits the ranges.
OVER_BUDGET_PER_TRIAL = 10


class SurplusTrial(Exception):
    """Workers racing for the last trial: the later one steps back (its trial ends FAIL, marked surplus)."""


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
        print(f"search: joining study {cfg.study_name!r} with its own settings for {', '.join(changed)}")
    return study, joined


def open_study(cfg: Config) -> tuple[optuna.Study, Config]:
    """An existing study and the Config it was created with (its data and settings); never creates one."""
    storage = open_storage(cfg)
    try:
        storage.get_study_id_from_name(cfg.study_name)
    except KeyError:
        raise PipelineError(f"no study {cfg.study_name!r} in {cfg.storage_url.split('@')[-1]}; run the search first") from None
    return load_or_create_study(cfg, storage)


def parent_run_id(study: optuna.Study, cfg: Config, storage: RDBStorage, under: str | None = None) -> str:
    """The study's one MLflow parent run: the first worker creates it (the `mlflow run` run, if any).

    ``under``: a pipeline run (``main``) the study's run is shown nested in.
    """
    with storage_lock(cfg, "parent"):
        attrs = storage.get_study_user_attrs(study._study_id)
        if PARENT_RUN_ATTR in attrs:
            if os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` of a joining worker: say where its trials go
                mlflow.MlflowClient().set_tag(os.environ.pop("MLFLOW_RUN_ID"), RunTag.SEARCH_PARENT_RUN_ID, attrs[PARENT_RUN_ATTR])
            return attrs[PARENT_RUN_ATTR]
        if os.environ.get("MLFLOW_RUN_ID"):
            # Consumed here: left in the environment, every nested start_run() would resume it instead.
            run_id = os.environ.pop("MLFLOW_RUN_ID")
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


def claimed_before(study: optuna.Study, number: int) -> int:
    """Trials numbered below ``number`` that count, or may still count, towards ``n_trials`` (over the budget: never)."""
    states = (*FINISHED, TrialState.RUNNING)
    return sum(1 for trial in study.get_trials(deepcopy=False, states=states) if trial.number < number and within_budget(trial))


def student_cost(cfg: Config, num_classes: int, image: np.ndarray) -> dict[str, float]:
    """The student's parameter count and median latency (ms, ``image``, this machine), keyed by ``BUDGETS``' measures.

    Both depend on the architecture alone, so they come from the untrained student, before anything is trained.
    """
    student = build_student(cfg.student_size, cfg.image_size, num_classes, seed=cfg.seed)
    return {Metric.STUDENT_PARAMS: student.count_params(), Metric.LATENCY_MS: keras_latency(student, image)["p50_ms"]}


def budget_text(settings: Mapping[str, float]) -> str:
    """The budgets set among ``settings`` (a Config's fields or a study's stored settings): ``max_params=34000``."""
    return ", ".join(f"{name}={settings[name]:g}" for name in BUDGETS if settings.get(name))


def cost_text(cost: Mapping[str, float]) -> str:
    return f"{cost[Metric.STUDENT_PARAMS]:,} parameters, {cost[Metric.LATENCY_MS]:.3g} ms"


def check_budget(cfg: Config, space: SearchSpace) -> None:
    """Refuse a budget that not even the search's smallest student fits (every trial would be skipped), before the study
    is created with it or any data is read.

    The smallest (low ends of width_range and depth_range) has the fewest parameters and the least work per image; with
    two classes, the fewest outputs: a budget refused here fits no student of the space on any data.
    """
    if not budget_text(vars(cfg)):
        return
    smallest = f"{space.width[0]}x{space.depth[0]}"
    cost = student_cost(cfg.replace(student_size=smallest), 2, np.zeros((1, cfg.image_size, cfg.image_size, 1), np.float32))
    over = [name for name, measure in BUDGETS.items() if 0 < getattr(cfg, name) < cost[measure]]
    if over:
        raise PipelineError(
            f"{budget_text(vars(cfg))}: the search's smallest student, {smallest} ({cost_text(cost)}), is already over it; "
            f"raise {' / '.join(over)} or lower width_range / depth_range"
        )


def teacher_finder(prepared: Prepared) -> Callable[[Config], str]:
    """The teacher run of a ``search.space.teacher_config``: found or trained once per worker, under the study's
    teacher lock, so workers that start together train each teacher once and the others reuse it. Called with the
    search run active, so a teacher trained here is shown nested in it."""
    runs: dict[str, str] = {}

    def teacher_run(teacher_cfg: Config) -> str:
        if teacher_cfg.teacher_arch not in runs:
            with teacher_lock(teacher_cfg):
                runs[teacher_cfg.teacher_arch] = train_teacher(teacher_cfg, prepared, nested=True)
        return runs[teacher_cfg.teacher_arch]

    return teacher_run


def make_objective(cfg: Config, space: SearchSpace, prepared: Prepared, teacher_run: Callable[[Config], str]):
    fold_ids = list(range(cfg.fold_count))
    multi = cfg.objectives != "f1"

    def objective(trial: optuna.Trial):
        if claimed_before(trial.study, trial.number) >= cfg.n_trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number}: the study already has {cfg.n_trials} trials")
        params, trial_cfg = space.suggest(trial, cfg)
        cost = student_cost(trial_cfg, prepared.dataset.num_classes, prepared.images[:1])
        trial.set_user_attr("student_params", cost[Metric.STUDENT_PARAMS])
        trial.set_user_attr("latency_ms", cost[Metric.LATENCY_MS])
        for name, measure in BUDGETS.items():
            # Optuna's constraint convention: feasible when <= 0. A retried trial keeps the values that admitted it.
            if getattr(cfg, name) and name not in trial.constraints:
                trial.set_constraint(name, cost[measure] - getattr(cfg, name))
        if not within_budget(trial):
            # Known before training, so nothing is trained: the trial ends PRUNED, which the TPE sampler learns from (it
            # ranks trials over the budget by how far over they are), and does not count towards n_trials
            # (``claimed_before``, ``state_counts``): the study still ends with n_trials students that fit.
            skipped = f"student {trial_cfg.student_size} ({cost_text(cost)}) over the budget ({budget_text(vars(cfg))})"
            print(f"search: trial {trial.number} skipped before training: {skipped}")
            raise optuna.TrialPruned(skipped)
        teacher_run_id = teacher_run(teacher_config(cfg, params))  # the trial's teacher, before its run: nested in the search's
        with tracked_run(cfg, finished_on=(optuna.TrialPruned,), nested=True, run_name=f"trial-{trial.number}") as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.set_tags(
                {
                    RunTag.STEP: "trial",
                    "optuna.study": cfg.study_name,
                    "optuna.trial_number": str(trial.number),
                    "optuna.state": "RUNNING",
                    RunTag.TEACHER_RUN_ID: teacher_run_id,
                }
            )
            mlflow.log_params({**params, "student_size": trial_cfg.student_size})
            fold_f1: list[float] = []

            def on_fold(k: int, metrics: dict[str, float]) -> None:
                fold_f1.append(metrics["f1"])
                mlflow.log_metric("fold_f1", metrics["f1"], step=k)
                if not multi:
                    trial.report(metrics["f1"], k)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"fold {k} F1 {metrics['f1']:.4f} below the median of earlier trials")

            try:
                cv = cross_validate_student(trial_cfg, prepared, teacher_run_id, fold_ids, on_fold)
            except optuna.TrialPruned:
                trial.set_user_attr("fold_f1", fold_f1)
                mlflow.set_tag("optuna.state", "PRUNED")
                raise
            except BaseException:
                mlflow.set_tag("optuna.state", "FAILED")
                raise
            summary = cv.summary()
            trial.set_user_attr("fold_f1", [m["f1"] for m in cv.fold_metrics])
            trial.set_user_attr("best_epochs", cv.best_epochs)
            trial.set_user_attr("f1_std", summary[Metric.F1_STD])
            mlflow.log_metrics({**summary, **cost})
            mlflow.log_dict(confusion_record(prepared.dataset.class_names, cv.confusion_matrices()), CONFUSION_ARTIFACT)
            log_oof_logits(prepared, cv.models, cv.fold_ids)  # what promote fits the student's temperature on
            mlflow.set_tag("optuna.state", "COMPLETE")
        if not multi:
            return summary[Metric.F1_MEAN]
        return summary[Metric.F1_MEAN], float(cost[Metric.STUDENT_PARAMS if cfg.objectives == "f1,params" else Metric.LATENCY_MS])

    return objective


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


def run_search(cfg: Config, under: str | None = None, prepared: Prepared | None = None) -> optuna.Study:
    """Join or create the study, make sure the teachers exist, then work until it has ``n_trials`` finished trials.

    ``under``: the id of a pipeline run the study's MLflow run is nested in (``main``); ``prepared``: its data.
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
    parent = parent_run_id(study, cfg, storage, under)
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
        print(f"search: worker {worker} done; study {cfg.study_name!r} has {finished} finished trials")
        log_summary(study, cfg)
    return study


def log_summary(study: optuna.Study, cfg: Config) -> None:
    """Best trial, the results table and Optuna's plots on the parent run (the last worker's write wins)."""
    best = best_trial(study)
    counts, over = state_counts(study)
    mlflow.log_metrics(
        {
            "best_f1_mean": best.values[0],
            "best_f1_std": best.user_attrs.get("f1_std", float("nan")),
            "n_complete": counts[TrialState.COMPLETE],
            "n_pruned": counts[TrialState.PRUNED],
            "n_failed": counts[TrialState.FAIL],
            "n_over_budget": over,
        }
    )
    mlflow.set_tags({RunTag.BEST_TRIAL: str(best.number), RunTag.BEST_TRIAL_RUN_ID: best.user_attrs.get("mlflow_run_id", "")})
    mlflow.log_dict(
        {"number": best.number, "values": best.values, "params": best.params, "user_attrs": best.user_attrs}, "search/best_trial.json"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        study.trials_dataframe().to_csv(out / "trials.csv", index=False)
        write_plots(study, cfg, out)
        mlflow.log_artifacts(tmp, "search")
    print(
        f"search: best trial {best.number}: F1 {best.values[0]:.4f} ± {best.user_attrs.get('f1_std', float('nan')):.4f} "
        f"with {json.dumps(best.params)}"
    )


def write_plots(study: optuna.Study, cfg: Config, out: Path) -> None:
    """Optimisation history, parameter importances, parallel coordinates (and the Pareto front) as PNG."""
    plt = pyplot()
    from optuna.visualization import matplotlib as plots

    target = None if len(study.directions) == 1 else (lambda t: t.values[0])
    figures = {"optimization_history": lambda: plots.plot_optimization_history(study, target=target, target_name="F1")}
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(complete) >= 2:
        figures["param_importances"] = lambda: plots.plot_param_importances(study, target=target, target_name="F1")
        # Each axis is scaled to its values' range: an axis with one value has none (matplotlib warns of identical ylims).
        constant = sorted(name for name in complete[0].params if len({t.params.get(name) for t in complete}) == 1)
        if len({t.values[0] for t in complete}) == 1:
            constant.append("F1")
        if constant:
            print(f"search: skipped plot parallel_coordinate: {', '.join(constant)} took one value in every complete trial")
        else:
            figures["parallel_coordinate"] = lambda: plots.plot_parallel_coordinate(study, target=target, target_name="F1")
    if len(study.directions) > 1:
        figures["pareto_front"] = lambda: plots.plot_pareto_front(study, target_names=["F1", cfg.objectives.split(",")[1]])
    for name, draw in figures.items():
        try:
            # Optuna's plots switch the whole process to the ggplot style; the context restores ours after each,
            # so figures drawn later in the same process (promotion, report) look as they do on their own.
            with plt.rc_context():
                axes = draw()
        except (ValueError, RuntimeError) as error:  # e.g. importances when every trial has the same value
            print(f"search: skipped plot {name}: {error}")
            continue
        figure = axes.figure if hasattr(axes, "figure") else np.ravel(axes)[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(out / f"{name}.png", dpi=100)
        plt.close(figure)
