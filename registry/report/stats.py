"""The report's statistics: bootstrap intervals of the hold-out metrics, the corrected resampled t-test of KD vs no-KD
on the folds of every repeat,
per-fold and per-class F1, search parameter importances, and :class:`Findings`, every number of the results
section computed once (``report.json``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipelines.config import BOOTSTRAP_RESAMPLES, PipelineError
from pipelines.evaluation.metrics import class_keys, classification_metrics
from pipelines.evaluation.statistics import corrected_resampled_t_test, holm, kfold_test_train_ratio
from pipelines.names import Metric
from registry.report.gather import MODELS, ComparisonResults, Sources, holdout_arrays

METRICS = {
    "f1": "F1",
    "accuracy": "Accuracy",
    "precision": "Precision",
    "recall": "Recall (sensitivity)",
    "specificity": "Specificity",
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC",
}


def bootstrap_intervals(
    labels: np.ndarray, probs: dict[str, np.ndarray], resamples: int, seed: int
) -> dict[str, dict[str, tuple[float, float]]]:
    """95% percentile intervals of every metric; the same resampled images for every model (paired)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(resamples, len(labels)))
    values = {who: {name: [] for name in METRICS} for who in probs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resamples with one class: AUCs are NaN and skipped
        for rows in draws:
            for who, p in probs.items():
                for name, value in classification_metrics(labels[rows], p[rows]).items():
                    values[who][name].append(value)
    result = {}
    for who, by_metric in values.items():
        result[who] = {}
        for name, samples in by_metric.items():
            samples = np.asarray(samples, dtype=np.float64)
            samples = samples[np.isfinite(samples)]
            result[who][name] = (
                (float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))) if samples.size else (math.nan, math.nan)
            )
    return result


def fold_f1(metrics: dict[str, float], fold_count: int, who: str) -> list[float]:
    """A model's F1 of every validation fold entry (folds x repeats), in entry order (``f1_fold_<k>``)."""
    return fold_scores(metrics, fold_count, Metric.fold_f1, f"the {MODELS[who]}'s cross-validation")


def paired_test(kd: list[float], no_kd: list[float], folds: int) -> dict[str, float]:
    """KD vs no-KD per-fold F1 over every repeat's ``folds``-fold (same position, same repeat and fold), two-sided.

    The main figure is Nadeau and Bengio's corrected resampled t-test (``t``, ``t_pvalue``, ``df``; ``n`` paired
    scores), whose variance allows for the training sets the folds share; the Wilcoxon signed-rank test is secondary
    (it assumes independent pairs too, but no normality)."""
    from scipy import stats

    corrected = corrected_resampled_t_test(kd, no_kd, kfold_test_train_ratio(folds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identical folds give NaN statistics, reported as n/a
        w = stats.wilcoxon(kd, no_kd)
    return {
        "mean_difference": corrected.mean_difference,
        "t": corrected.t,
        "t_pvalue": corrected.pvalue,
        "df": corrected.df,
        "n": corrected.n,
        "test_train_ratio": kfold_test_train_ratio(folds),
        "wilcoxon": float(w.statistic),
        "wilcoxon_pvalue": float(w.pvalue),
    }


def per_class_scores(labels: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support of each class at the arg-max decision (0 where undefined)."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, probs.argmax(axis=1), labels=np.arange(n_classes), zero_division=0
    )
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def per_class_f1_rows(class_names: list[str]) -> list[tuple[str, str]]:
    """(row label, metric key) of the per-class F1 figures: each class, then macro-F1 (keys never collide)."""
    return [*((name, f"f1_{key}") for name, key in zip(class_names, class_keys(class_names))), ("macro", "f1_macro")]


def per_class_f1_numbers(s: Sources) -> dict[str, dict[str, dict[str, float]]]:
    """Per-class and macro F1 of each model as logged, by metric key: k-fold means (its cross-validation run)
    and hold-out (the promote run); NaN where a run predates these metrics."""
    rows = per_class_f1_rows(s.class_names)
    return {
        who: {
            "kfold_mean": {key: s.cv_metrics[who].get(f"{key}_mean", math.nan) for _, key in rows},
            "holdout": {key: s.promote.data.metrics.get(f"holdout_{who}_{key}", math.nan) for _, key in rows},
        }
        for who in MODELS
    }


def param_importances(s: Sources) -> tuple[dict[str, float], str]:
    """Importances of the search parameters for the first objective, and a note on what they were computed from.

    Computed as optuna-dashboard computes them (PED-ANOVA with its default settings, the objective negated when
    maximised), so the figure and the dashboard show the same numbers. Only complete trials have an objective value.
    """
    if s.study is None:
        return {}, s.study_note
    import optuna
    from optuna.trial import TrialState

    complete = len(s.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    used = f"the study's {complete} complete trials of {len(s.study.trials)} (pruned and failed trials have no objective value)"
    if complete < 2:
        return {}, f"not computed: {used}; importances need at least 2"
    sign = -1.0 if s.study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PED-ANOVA's notes on targets and small studies; the caption says what was used
        raw = optuna.importance.PedAnovaImportanceEvaluator().evaluate(s.study, target=lambda trial: sign * trial.values[0])
    total = sum(raw.values())
    if total <= 0:  # what get_param_importances and the dashboard then show: equal shares, which say nothing
        return {}, f"PED-ANOVA over {used} cannot tell the parameters apart (every importance is 0; optuna-dashboard shows equal shares)"
    ranked = dict(sorted(((name, value / total) for name, value in raw.items()), key=lambda item: -item[1]))
    return ranked, f"PED-ANOVA, as optuna-dashboard computes it, over {used}"


@dataclass(frozen=True)
class Findings:
    """Every number of the results section, computed once from the sources; keys of models as :data:`MODELS`."""

    labels: np.ndarray  # hold-out class indices
    probs: dict[str, np.ndarray]  # hold-out class probabilities
    kfold: dict[str, dict[str, dict[str, float]]]  # model -> metric -> {"mean", "std"} over the validation folds
    holdout: dict[str, dict[str, float]]  # model -> metric, as logged by promote
    intervals: dict[str, dict[str, tuple[float, float]]]  # model -> metric -> 95% bootstrap interval
    resamples: int
    fold_f1: dict[str, list[float]]  # model -> F1 of every fold entry (k = repeat * folds + fold)
    paired_test: dict[str, float]  # KD vs no-KD on the fold entries (paired_test)
    importances: dict[str, float]
    importance_note: str
    class_counts: dict[str, int]  # hold-out images per class
    per_class_f1: dict[str, dict[str, dict[str, float]]]


def findings(s: Sources, resamples: int = BOOTSTRAP_RESAMPLES) -> Findings:
    """Read the logged metrics and compute the statistics of the results section."""
    labels, probs = holdout_arrays(s)
    per_fold = {who: fold_f1(metrics, s.data_cfg.fold_count, who) for who, metrics in s.cv_metrics.items()}
    importances, importance_note = param_importances(s)
    return Findings(
        labels=labels,
        probs=probs,
        kfold={
            who: {m: {"mean": metrics.get(f"{m}_mean", math.nan), "std": metrics.get(f"{m}_std", math.nan)} for m in METRICS}
            for who, metrics in s.cv_metrics.items()
        },
        holdout={who: {m: s.promote.data.metrics.get(f"holdout_{who}_{m}", math.nan) for m in METRICS} for who in MODELS},
        intervals=bootstrap_intervals(labels, probs, resamples, s.data_cfg.seed),
        resamples=resamples,
        fold_f1=per_fold,
        paired_test=paired_test(per_fold["student"], per_fold["no_kd"], s.data_cfg.folds),
        importances=importances,
        importance_note=importance_note,
        class_counts={name: int((labels == i).sum()) for i, name in enumerate(s.class_names)},
        per_class_f1=per_class_f1_numbers(s),
    )


def report_numbers(s: Sources, f: Findings) -> dict:
    """Every number the results use, with the runs they come from (``report.json``)."""
    return {
        "model": s.model_name,
        "version": s.version.version,
        "kfold": f.kfold,
        "holdout": f.holdout,
        "holdout_ci95": {who: {m: list(v) for m, v in by.items()} for who, by in f.intervals.items()},
        "fold_f1": f.fold_f1,
        "paired_test": f.paired_test,
        "param_importances": f.importances,
        "holdout_class_counts": f.class_counts,
        "per_class_f1": f.per_class_f1,
        "runs": {
            "promote": s.promote.info.run_id,
            "teacher": ",".join(run.info.run_id for run in s.teacher_members),
            "trial": s.trial.info.run_id,
            "no_kd_cv": s.no_kd.info.run_id,
            "search": s.search.info.run_id,
        },
    }


# ---------------------------------------------------------------- a comparison's tables


def fold_scores(metrics: dict[str, float], fold_count: int, key: Callable[[int], str], owner: str) -> list[float]:
    """The metric ``key(k)`` of every validation fold entry k (folds x repeats) in entry order, for a paired test."""
    missing = [key(k) for k in range(fold_count) if key(k) not in metrics]
    if missing:
        raise PipelineError(f"{owner} has no {', '.join(missing)}; the paired test needs every fold entry (0 to {fold_count - 1})")
    return [metrics[key(k)] for k in range(fold_count)]


def baseline_table(results: ComparisonResults) -> pd.DataFrame:
    """One row per teacher run and per no-KD cell at each ratio: k-fold F1, macro F1 and each class's F1, mean and
    standard deviation over the fold entries, as their runs logged them (NaN where a run lacks one)."""
    keys = ["f1", "f1_macro", *(f"f1_{key}" for key in class_keys(results.class_names))]
    rows, seen = [], set()
    for cell in results.cells:
        if cell.kd:
            members = [(results.teachers[run_id], "teacher", Metric.TEACHER_PARAMS) for run_id in cell.teacher_run_ids]
        else:
            members = [(cell.run, "no-KD student", Metric.STUDENT_PARAMS)]
        for run, kind, params in members:
            if (run.info.run_id, cell.ratio) in seen:  # a teacher serves every student of its ratio: one row
                continue
            seen.add((run.info.run_id, cell.ratio))
            metrics = run.data.metrics
            model = run.data.params.get("teacher_arch", cell.teacher) if kind == "teacher" else cell.student
            row = {"ratio": cell.ratio, "model": model, "kind": kind, "params": metrics.get(params, math.nan), "run_id": run.info.run_id}
            for key in keys:
                row[f"{key}_mean"], row[f"{key}_std"] = metrics.get(f"{key}_mean", math.nan), metrics.get(f"{key}_std", math.nan)
            rows.append(row)
    return pd.DataFrame(rows)


# The two families of KD - no-KD differences: (column prefix, per-fold metric, mean and std metrics)
FAMILIES = {
    "f1": (Metric.fold_f1, Metric.F1_MEAN, Metric.F1_STD),
    "f1_minority": (Metric.minority_fold_f1, Metric.F1_MINORITY_MEAN, Metric.F1_MINORITY_STD),
}


def kd_table(results: ComparisonResults) -> pd.DataFrame:
    """One row per KD cell: its F1 and minority F1 (mean, std), minority recall, and for each family the mean paired
    difference KD - no-KD over the fold entries (``delta_<family>``), its corrected resampled t-test p-value
    (``p_<family>``) and Holm's adjustment of that p across every KD cell (``p_<family>_holm``)."""
    twins = {(cell.student, cell.ratio): cell for cell in results.cells if not cell.kd}
    rows = []
    for cell in (cell for cell in results.cells if cell.kd):
        twin = twins.get((cell.student, cell.ratio))
        if twin is None:
            raise PipelineError(f"{cell.describe()} has no finished no-KD cell of its student and ratio to be compared with")
        row = {
            "teacher": cell.teacher,
            "student": cell.student,
            "ratio": cell.ratio,
            "student_params": cell.metrics.get(Metric.STUDENT_PARAMS, math.nan),
            "recall_minority_mean": cell.metrics.get(Metric.RECALL_MINORITY_MEAN, math.nan),
            "no_kd_recall_minority_mean": twin.metrics.get(Metric.RECALL_MINORITY_MEAN, math.nan),
            "run_id": cell.run.info.run_id,
            "no_kd_run_id": twin.run.info.run_id,
            "test_train_ratio": cell.metrics.get(Metric.TEST_TRAIN_RATIO, results.test_train_ratio),
        }
        for family, (fold_key, mean_key, std_key) in FAMILIES.items():
            kd_scores = fold_scores(cell.metrics, results.fold_count, fold_key, cell.describe())
            no_kd_scores = fold_scores(twin.metrics, results.fold_count, fold_key, twin.describe())
            test_train = cell.metrics.get(Metric.TEST_TRAIN_RATIO, results.test_train_ratio)
            test = corrected_resampled_t_test(kd_scores, no_kd_scores, test_train)
            row |= {
                f"{family}_mean": cell.metrics.get(mean_key, math.nan),
                f"{family}_std": cell.metrics.get(std_key, math.nan),
                f"no_kd_{family}_mean": twin.metrics.get(mean_key, math.nan),
                f"delta_{family}": test.mean_difference,
                f"t_{family}": test.t,
                f"p_{family}": test.pvalue,
            }
        rows.append(row)
    if not rows:
        raise PipelineError(f"comparison {results.name!r} (run {results.run.info.run_id}) has no finished KD cell yet")
    frame = pd.DataFrame(rows)
    for family in FAMILIES:
        frame[f"p_{family}_holm"] = holm(frame[f"p_{family}"].tolist())
    return frame


def comparison_numbers(results: ComparisonResults) -> dict:
    """Every number of the comparison's tables, with the runs they come from (for ``report.json``)."""
    return {
        "run_id": results.run.info.run_id,
        "name": results.name,
        "test_train_ratio": results.test_train_ratio,
        "baseline": baseline_table(results).to_dict("records"),
        "kd": kd_table(results).to_dict("records"),
    }
