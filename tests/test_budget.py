"""A size/latency budget on the search (``max_params``, ``max_latency_ms``): students over it are skipped before
training, every trial records its constraint values, and the best trial, the one promoted, is always within the budget.
Tiny real runs: the embedded synthetic set of 40 images at 32 px, 2 folds, 1 epoch, the small resnet teacher."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from kdtest import tracking_at
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipelines.config import Config, PipelineError
from pipelines.steps.prepare import prepare_data
from registry.promote import promote
from search.objective import make_objective
from search.space import SearchSpace
from search.study import PARENT_RUN_ATTR, best_trial, load_or_create_study, open_storage, within_budget
from search.tune import run_search

# width_range 8,16 x depth_range 2,3 holds students of 1,305 (8x2) to 23,537 (16x3) parameters; 10,000 admits 8x2, 8x3,
# 12x2 and 16x2 and refuses 12x3 and 16x3, among them the default student (small = 16x3) of both anchor trials.
BUDGET = 10_000


def _budget_cfg(root: Path, **changes) -> Config:
    tiny = dict(
        data_dir="",
        synthetic_images=40,
        image_size=32,
        folds=2,
        epochs=1,
        patience=1,
        batch_size=16,
        teacher_arch="resnet:S",
        width_range="8,16",
        depth_range="2,3",
        max_params=BUDGET,
        n_trials=2,
        study_name="budget",
        storage=f"sqlite:///{root / 'optuna.db'}",
        model_name="budget-student",
        experiment_name="budget",
        cache_dir=str(root / "cache"),
    )
    return Config(**{**tiny, **changes})


@pytest.fixture(scope="module")
def budget_store(tmp_path_factory):
    """One tracking store for the module: the searches share its teacher."""
    root = tmp_path_factory.mktemp("budget")
    with tracking_at(f"sqlite:///{root / 'mlflow.db'}"):
        yield root


def _check_every_trial_within_or_skipped(study) -> list:
    """Every trial recorded its max_params constraint; those over it were never trained; returns those within it."""
    for trial in study.trials:
        assert trial.constraints == {"max_params": trial.user_attrs["student_params"] - BUDGET}, trial.number
        if not within_budget(trial):
            assert trial.state == TrialState.PRUNED and "mlflow_run_id" not in trial.user_attrs, f"trial {trial.number} was trained"
    within = [t for t in study.trials if within_budget(t)]
    assert len([t for t in within if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 2, "n_trials counts students that fit"
    complete = [t for t in within if t.state == TrialState.COMPLETE]
    assert complete and all(t.user_attrs["student_params"] <= BUDGET for t in complete)
    best = best_trial(study)
    assert within_budget(best) and best.user_attrs["student_params"] <= BUDGET
    return within


@pytest.mark.slow
def test_constraints_make_every_promoted_student_feasible(budget_store, reliability):
    cfg = _budget_cfg(budget_store)
    study = run_search(cfg)
    _check_every_trial_within_or_skipped(study)
    anchors = study.trials[:2]
    assert [t.params["width"] * 10 + t.params["depth"] for t in anchors] == [163, 163], "the anchors start with the default student"
    assert all(not within_budget(t) for t in anchors), "the default student (16x3, 23,537 parameters) is over the budget: skipped"
    client = MlflowClient()
    parent = client.get_run(study.user_attrs[PARENT_RUN_ATTR])
    skipped = len([t for t in study.trials if not within_budget(t)])
    assert parent.data.metrics["n_over_budget"] == skipped and parent.data.params["max_params"] == str(BUDGET)
    trial_runs = client.search_runs([parent.info.experiment_id], "tags.`optuna.study` = 'budget' and tags.`kd.step` = 'trial'")
    assert len(trial_runs) == len(study.trials) - skipped, "a student over the budget gets no run: nothing was trained"

    promotion = promote(cfg)
    version = client.get_model_version(cfg.model_name, promotion.version)
    assert int(version.tags["params_count"]) <= BUDGET
    assert int(version.tags["params_count"]) == best_trial(study).user_attrs["student_params"]
    reliability.bad_input(
        "a search with max_params below the default student's size",
        f"{skipped} students over the budget skipped before training (anchors included); promoted v{promotion.version} "
        f"has {version.tags['params_count']} <= {BUDGET} parameters",
    )


@pytest.mark.slow
def test_a_pareto_search_of_f1_and_params_keeps_to_the_budget(budget_store):
    study = run_search(_budget_cfg(budget_store, objectives="f1,params", study_name="budget-pareto"))
    within = _check_every_trial_within_or_skipped(study)
    front = study.best_trials
    assert front and all(within_budget(t) and t.values[1] == t.user_attrs["student_params"] <= BUDGET for t in front)
    assert best_trial(study) in front and all(t in within for t in front)


def test_a_study_with_no_student_within_its_budget_gives_promote_an_error_naming_the_budget(tmp_path):
    """Both anchors (the default student, over the budget) through the search's own objective: skipped without a
    teacher or any training; the study then has nothing to promote, and says which setting to change."""
    cfg = _budget_cfg(tmp_path)
    study, cfg = load_or_create_study(cfg, open_storage(cfg))

    def no_teacher(teacher_cfg: Config) -> str:
        raise AssertionError("a student over the budget needs no teacher")

    objective = make_objective(cfg, SearchSpace.from_config(cfg), prepare_data(cfg), no_teacher)
    study.optimize(objective, n_trials=2)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2 and not any(within_budget(t) for t in study.trials)
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        with pytest.raises(PipelineError) as error:
            promote(cfg)
        assert not mlflow.MlflowClient().search_registered_models(), "nothing registered (in the store promote used)"
    message = str(error.value)
    assert f"no complete trial within its budget (max_params={BUDGET})" in message and "larger max_params / max_latency_ms" in message


@pytest.mark.parametrize(
    "budget, match",
    [
        ({"max_params": 1000}, r"max_params=1000: the search's smallest student, 8x2 \(1,305 parameters, .* ms\), is already over it; "),
        ({"max_latency_ms": 1e-4}, r"max_latency_ms=0\.0001: the search's smallest student, 8x2 .* raise max_latency_ms"),
    ],
    ids=["max_params", "max_latency_ms"],
)
def test_a_budget_not_even_the_smallest_student_fits_is_refused_before_the_study_exists(tmp_path, budget, match):
    with pytest.raises(PipelineError, match=match):
        run_search(_budget_cfg(tmp_path, **{"max_params": 0, **budget}))
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "cache").exists(), "no study created, no data read"
