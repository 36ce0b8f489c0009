"""What a finished search logs to its parent run: the best trial's parameters and scores, and the study's plots."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import optuna
from optuna.trial import TrialState

from pipelines.config import Config
from pipelines.evaluation.metrics import pyplot
from pipelines.log import logger
from pipelines.names import RunTag
from pipelines.steps.distill import describe_student
from search.space import trial_config
from search.study import best_trial, state_counts


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
    logger("search").info(
        f"best trial {best.number}: F1 {best.values[0]:.4f} ± {best.user_attrs.get('f1_std', float('nan')):.4f} "
        f"with {describe_student(trial_config(cfg, best.params))} {json.dumps(best.params)}"
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
            logger("search").info(f"skipped plot parallel_coordinate: {', '.join(constant)} took one value in every complete trial")
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
            logger("search").info(f"skipped plot {name}: {error}")
            continue
        figure = axes.figure if hasattr(axes, "figure") else np.ravel(axes)[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(out / f"{name}.png", dpi=100)
        plt.close(figure)
