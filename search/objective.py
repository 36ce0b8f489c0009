"""A search trial: its student's budget (parameters, latency) checked before training, the teachers it distils from
found or trained once per worker, and the objective that cross-validates the student and reports each fold's F1 to
the pruner."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import mlflow
import numpy as np
import optuna
from optuna.trial import TrialState

from pipelines.config import Config, PipelineError
from pipelines.evaluation.calibration import log_oof_logits
from pipelines.evaluation.latency import keras_latency
from pipelines.evaluation.metrics import CONFUSION_ARTIFACT, confusion_record
from pipelines.log import logger
from pipelines.models.builders import build_student
from pipelines.names import Metric, RunTag
from pipelines.steps.distill import cross_validate_student, describe_student
from pipelines.steps.prepare import Prepared
from pipelines.steps.teacher import train_teacher
from pipelines.tracking.locks import teacher_lock
from pipelines.tracking.runs import tracked_run
from search.space import SearchSpace, teacher_config
from search.study import BUDGETS, FINISHED, budget_text, within_budget

# A study whose sampler proposed this many students over the budget per trial asked for stops: the budget hardly fits the ranges.
OVER_BUDGET_PER_TRIAL = 10


class SurplusTrial(Exception):
    """Workers racing for the last trial: the later one steps back (its trial ends FAIL, marked surplus)."""


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
            logger("search").info(f"trial {trial.number} skipped before training: {skipped}")
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
            logger("search").info(f"trial {trial.number}: {describe_student(trial_cfg)}")
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
