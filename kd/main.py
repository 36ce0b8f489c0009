"""Entry point ``main``: prepare -> teacher -> search -> promote, reusing every finished step whose data and
parameters match (the search resumes its study; promotion is skipped when the champion already is that trial)."""

from __future__ import annotations

import time

import mlflow

from pipelines.config import Config
from pipelines.log import logger
from pipelines.names import Metric, RunTag, VersionTag
from pipelines.steps.distill import describe_student
from pipelines.steps.prepare import Prepared, prepare, prepare_data
from pipelines.steps.teacher import train_teacher
from pipelines.tracking.runs import close_stale_runs, tracked_run
from registry.promote import promote
from registry.roles import CHALLENGER, CHAMPION, current_version
from search.compare import clock
from search.space import trial_config
from search.study import PARENT_RUN_ATTR, best_trial
from search.tune import run_search

STEPS = ("prepare", "teacher", "search", "promote")


class StepClock:
    """Each step's wall time from the end of the one before (the first from the clock's start), printed as it ends; the
    whole chain's as ``main``."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.walls: dict[str, float] = {}

    def done(self, step: str) -> None:
        now = time.monotonic()
        self.walls[step], self.last = now - self.last, now
        logger("main").info(f"{step} took {clock(self.walls[step])}")

    def metrics(self) -> dict[str, float]:
        """``<step>_wall_s`` of every step and ``main_wall_s`` (seconds)."""
        return {Metric.wall_s(step): seconds for step, seconds in {**self.walls, "main": time.monotonic() - self.start}.items()}


def run_main(
    cfg: Config, tags: dict[str, str] | None = None, prepared: Prepared | None = None, launched_run_id: str | None = None
) -> dict[str, str]:
    """Run the chain under one ``main`` run (steps nested in it, ``tags`` on it; ``launched_run_id``, the run ``mlflow
    run`` started, resumed as the main run); returns each step's run id and the main run's (``main``). Logs each step's
    wall time on the main run (``prepare_wall_s``, ..., ``main_wall_s``: a step that was reused takes the seconds it took
    to find it).

    The data is ingested, decoded and hashed once here (counted in prepare's time); every step of the chain gets that one
    :class:`Prepared` (``prepared``: a caller's, used when it was prepared from the same data settings).
    """
    steps = StepClock()
    prepared = prepare_data(cfg, reuse=prepared)
    if not launched_run_id:  # a launched run is in the experiment `mlflow run` chose
        mlflow.set_experiment(cfg.experiment_name)
    close_stale_runs()
    with tracked_run(cfg, step="main", run_name="main", tags=tags, run_id=launched_run_id) as parent:
        mlflow.set_tags({RunTag.STEP: "main", RunTag.DATA_DIGEST: prepared.dataset.digest})
        runs = {"prepare": prepare(cfg, prepared, nested=True)}
        steps.done("prepare")
        runs["teacher"] = train_teacher(cfg, prepared, nested=True)
        steps.done("teacher")
    main_id = parent.info.run_id

    study = run_search(cfg, under=main_id, prepared=prepared)
    runs["search"] = study.user_attrs[PARENT_RUN_ATTR]
    steps.done("search")
    best = best_trial(study)
    client = mlflow.MlflowClient()
    evaluated = f"trial {best.number} of {cfg.study_name!r}"
    for role in (CHAMPION, CHALLENGER):  # this trial on these data was promoted, or refused by the gate, already
        holder = current_version(client, cfg.model_name, role)
        if holder is not None and (
            holder.tags.get(VersionTag.STUDY),
            holder.tags.get(VersionTag.TRIAL),
            holder.tags.get(VersionTag.DATA_DIGEST),
        ) == (cfg.study_name, str(best.number), prepared.dataset.digest):
            logger("promote").info(f"{role} {cfg.model_name} v{holder.version} already is {evaluated}; nothing to promote")
            runs["promote"] = holder.run_id
            break
    else:
        promotion = promote(cfg, under=main_id, prepared=prepared)
        runs["promote"] = client.get_model_version(cfg.model_name, promotion.version).run_id
    steps.done("promote")

    production = current_version(client, cfg.model_name, CHAMPION)
    pointers = {RunTag.step_run_id(step): run_id for step, run_id in runs.items()}
    if production is not None:
        pointers[RunTag.PRODUCTION_VERSION] = production.version
    for key, value in pointers.items():
        client.set_tag(main_id, key, value)
    walls = steps.metrics()
    for key, seconds in walls.items():
        client.log_metric(main_id, key, seconds)
    tracking_uri = mlflow.get_tracking_uri()
    print("\nDone. Where to look:")
    print(f"  tracking store  : {tracking_uri}   (browse: mlflow ui --backend-store-uri {tracking_uri})")
    for step, run_id in {"main": main_id, **runs}.items():
        print(f"  {step:<16}: run {run_id}")
    print("  wall time       : " + ", ".join(f"{step} {clock(walls[Metric.wall_s(step)])}" for step in (*STEPS, "main")))
    runs["main"] = main_id
    print(
        f"  best trial      : {best.number}, k-fold F1 {best.values[0]:.4f} ± {best.user_attrs.get('f1_std', float('nan')):.4f},"
        f" {describe_student(trial_config(cfg, best.params))} {best.params}"
    )
    if production is None:
        gate = client.get_run(runs["promote"]).data.tags.get(RunTag.GATE, "see the promote run")
        print(f"  Production model: none: the gate refused {evaluated} ({gate}); it is the challenger (kd fetch --alias challenger)")
        print("                    promote it anyway with force=true, or search longer (more n_trials)")
        return runs
    print(
        f"  Production model: models:/{cfg.model_name}/Production  (v{production.version}, hold-out F1 "
        f"{production.tags.get(VersionTag.HOLDOUT_F1)})"
    )
    print(
        f"  trained on      : {production.tags.get(VersionTag.TRAINED_ON, 'not recorded')},"
        f" data digest {production.tags.get(VersionTag.DATA_DIGEST, '')[:12]}"
    )
    print(f"  serve it        : kd serve -m models:/{cfg.model_name}/Production -p 5001")
    return runs
