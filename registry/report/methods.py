"""The report's methods section as document blocks, one function per heading: the data and model headings
(``methods_data``, ``methods_model``), then the search, the metrics, the software and hardware and how to reproduce
it. Every number comes from :class:`Sources`."""

from __future__ import annotations

from dataclasses import fields

from pipelines.config import Config
from pipelines.names import VersionTag
from registry.report.document import Block, Code, Heading, Math, bullets, num, para, table
from registry.report.gather import Sources
from registry.report.methods_data import data_parts, data_section, fold_words, split_section
from registry.report.methods_model import architecture_section, distillation_section, optimisation_section
from registry.report.stats import (
    BOOTSTRAP_RESAMPLES,
)


def methodology(s: Sources, resamples: int = BOOTSTRAP_RESAMPLES) -> list[Block]:
    """The methods section: data, split protocol, architectures, distillation, optimisation, search, metrics,
    software and hardware, reproducibility."""
    return [
        Heading(1, "Methods"),
        *data_section(s),
        *split_section(s),
        *architecture_section(s),
        *distillation_section(s),
        *optimisation_section(s),
        *search_section(s),
        *metrics_section(s, resamples),
        *environment_section(s),
        *reproducibility_section(s),
    ]


def search_section(s: Sources) -> list[Block]:
    """Heading "Hyper-parameter search": the study's objective, sampler, pruner, trials and search space."""
    blocks: list[Block] = [Heading(2, "Hyper-parameter search")]
    params = s.search.data.params
    objectives = params.get("objectives", "f1")
    objective = "the mean k-fold F1 of the distilled student (maximised)" + (
        "" if objectives == "f1" else f", and {objectives.split(',')[1]} (minimised) as a second objective"
    )
    if s.study is None:
        return blocks + [
            para(
                f"Optuna study {params.get('study_name')!r} with {params.get('n_trials')} trials; objective: {objective}. "
                f"The study itself could not be read: {s.study_note}."
            )
        ]
    from optuna.trial import TrialState

    states = {state.name.lower(): 0 for state in TrialState}
    for trial in s.study.get_trials(deepcopy=False):
        states[trial.state.name.lower()] += 1
    sampler, pruner = search_settings(s.study)
    seed = s.study.user_attrs.get("config", {}).get("seed")
    blocks += [
        para(
            f"Optuna study {s.study.study_name!r}: objective {objective}. "
            f"Sampler {sampler}, seeded with {seed} by the worker that created the study; pruner {pruner}, "
            f"fed each fold's F1. Trials: "
            + ", ".join(f"{n} {state}" for state, n in states.items() if n)
            + f" (target: {params.get('n_trials')} finished). "
            f"Each trial cross-validated a student on the same {fold_words(s.data_cfg)} with the teachers' cached logits. "
            f"The best trial ({s.version.tags.get(VersionTag.TRIAL)}) was retrained on the whole training part."
        ),
        table(
            "search-space",
            "Search space (from the study's trial distributions).",
            ["parameter", "type", "low", "high", "scale", "step"],
            search_space_rows(s.study),
        ),
    ]
    return blocks


def metrics_section(s: Sources, resamples: int) -> list[Block]:
    """Heading "Metrics": the definitions, and how intervals and the KD vs no-KD test are computed."""
    cfg = s.data_cfg
    _, _, test = data_parts(s)
    return [
        Heading(2, "Metrics"),
        para(
            "With TP, FP, TN and FN the true/false positives/negatives of "
            + ("the positive class" if s.binary else "each class (one-vs-rest, then averaged over classes)")
            + " at the arg-max decision: "
        ),
        bullets(
            ("accuracy ", Math(r"= (TP + TN) / N"), " (over all classes)"),
            ("precision ", Math("= TP / (TP + FP)")),
            ("recall (sensitivity) ", Math("= TP / (TP + FN)")),
            ("specificity ", Math("= TN / (TN + FP)")),
            ("F1 ", Math(r"= 2\,\mathrm{precision}\cdot\mathrm{recall} / (\mathrm{precision} + \mathrm{recall})")),
            ("ROC-AUC: area under the ROC curve of the predicted probability (one-vs-rest, macro-averaged for more classes)",),
            ("PR-AUC: average precision (step-wise area under the precision-recall curve)",),
        ),
        para(
            f"k-fold results are mean ± sample standard deviation over the {fold_words(cfg)}. "
            "Hold-out 95% confidence intervals are percentile intervals of "
            f"{resamples} paired bootstrap resamples of the {len(test)} hold-out images (seed {cfg.seed}). "
            f"KD and no-KD are compared on their per-fold F1 differences d over the n = {cfg.fold_count} folds (same folds, "
            "same initialisation seeds) with the corrected resampled t-test of Nadeau and Bengio (2003), ",
            Math(r"t = \bar{d} / \sqrt{(1/n + n_\mathrm{test}/n_\mathrm{train})\, s_d^2}"),
            f" with n − 1 degrees of freedom and n_test/n_train = 1/(k − 1) = {num(1 / (cfg.folds - 1))} for k = {cfg.folds} folds: "
            "the plain paired t-test takes the folds for independent samples, but their training sets overlap, "
            "which makes it too confident (Bouckaert and Frank 2004 apply the correction over repeated cross-validation). "
            "A Wilcoxon signed-rank test on the same pairs is given as a secondary figure.",
        ),
    ]


def environment_section(s: Sources) -> list[Block]:
    """Heading "Software and hardware": the machine and package versions of the final training (logged by promote)."""
    env = s.environment
    gpus = ", ".join(env.get("gpus") or []) or "none"
    return [
        Heading(2, "Software and hardware"),
        para(
            f"Final training ran on {env.get('cpu')} "
            f"({env.get('cpu_count')} logical CPUs, {env.get('memory_gib')} GiB memory; GPUs: {gpus}), "
            f"{env.get('platform')}, Python {env.get('python')}, with "
            + ", ".join(f"{name} {version}" for name, version in env.get("packages", {}).items())
            + "."
        ),
    ]


def reproducibility_section(s: Sources) -> list[Block]:
    """Heading "Reproducibility": the model, data digest, runs, and the commands that rerun the pipeline and this report."""
    return [
        Heading(2, "Reproducibility"),
        bullets(
            (
                "model: ",
                Code(f"models:/{s.model_name}/{s.version.version}"),
                f" ({s.version.current_stage}), code version ",
                Code(s.version.tags.get(VersionTag.CODE_VERSION, "unknown")),
            ),
            ("data digest: ", Code(s.version.tags.get(VersionTag.DATA_DIGEST, ""))),
            (
                "teacher run " if not s.ensemble else "teacher runs (ensemble members) ",
                Code(",".join(run.info.run_id for run in s.teacher_members)),
                ", search run ",
                Code(s.search.info.run_id),
                ", best trial run ",
                Code(s.trial.info.run_id),
                f" (trial {s.version.tags.get(VersionTag.TRIAL)})",
            ),
            ("no-KD cross-validation run ", Code(s.no_kd.info.run_id), ", promote run ", Code(s.promote.info.run_id)),
            ("rerun: ", Code(rerun_command(s))),
            ("this report: ", Code(f"mlflow run . -e report --env-manager local -P model_name={s.model_name} {s.selector}")),
        ),
    ]


def search_settings(study) -> tuple[str, str]:
    """Sampler and pruner as the study's creating worker recorded them (``search.study``: its type and settings)."""
    from search.study import PRUNER_ATTR, SAMPLER_ATTR

    def described(attr: str) -> str:
        settings = dict(study.user_attrs.get(attr) or {})
        if not settings:
            return "not recorded (a study created before the settings were stored)"
        kind = settings.pop("type")
        return f"{kind} ({', '.join(f'{name} = {value}' for name, value in settings.items())})"

    return described(SAMPLER_ATTR), described(PRUNER_ATTR)


def search_space_rows(study) -> list[list[str]]:
    from optuna.trial import TrialState

    distributions: dict = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        distributions.update(trial.distributions)
    rows = []
    for name, distribution in sorted(distributions.items()):
        kind = type(distribution).__name__.replace("Distribution", "").lower()
        step = getattr(distribution, "step", None)
        rows.append(
            [
                name,
                kind,
                f"{distribution.low:g}",
                f"{distribution.high:g}",
                "log" if getattr(distribution, "log", False) else "linear",
                "" if step is None else f"{step:g}",
            ]
        )
    return rows


def rerun_command(s: Sources) -> str:
    """The ``main`` entry point with every parameter the study was created with (its stored settings)."""
    settings = dict(s.study.user_attrs.get("config", {})) if s.study is not None else {}
    params = {**{k: v for k, v in s.search.data.params.items() if k in {f.name for f in fields(Config)}}, **settings}
    params.update(
        {
            "study_name": s.search.data.params.get("study_name", ""),
            "n_trials": s.search.data.params.get("n_trials", ""),
            "model_name": s.model_name,
        }
    )
    return "mlflow run . -e main --env-manager local " + " ".join(f"-P {k}={v}" for k, v in sorted(params.items()))
