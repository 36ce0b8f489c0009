"""The methods and results sections of the report as document blocks: one function per heading of the methods,
one per part (table, test or figure) of the results. Every number comes from :class:`Sources` or :class:`Findings`."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from pipelines.config import Config, PipelineError
from pipelines.document import Block, Code, Equation, Figure, Heading, Math, bullets, data_label, num, para, table
from pipelines.names import Metric, RunTag, VersionTag
from registry.report.figures import confusion_figure, curve_figure, gradcam_examples, gradcam_figure, importance_figure
from registry.report.gather import MODELS, Sources
from registry.report.stats import BOOTSTRAP_RESAMPLES, METRICS, Findings, findings, per_class_f1_rows, per_class_scores, report_numbers
from registry.report.trust import calibration_numbers, calibration_result, card_result
from search.comparison_tables import ComparisonResults, comparison_blocks, comparison_numbers, plot_comparison

# ---------------------------------------------------------------- methods


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


def data_parts(s: Sources) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The images counted (hold-out duplicates of training images left out by dedupe=drop are in no count), their
    training part and their hold-out split."""
    splits = s.splits[s.splits["split"] != "dropped"]
    return splits, splits[splits["split"] != "test"], splits[splits["split"] == "test"]


def cross_validation_words(cfg: Config) -> str:
    """The cross-validation in words: ``stratified group 5-fold cross-validation``, and its repeats when there are more."""
    words = f"stratified group {cfg.folds}-fold cross-validation"
    if cfg.repeats > 1:
        words += f" repeated {cfg.repeats} times with new fold seeds ({cfg.fold_count} validation folds)"
    return words


def fold_words(cfg: Config) -> str:
    """The validation folds counted: ``5 validation folds``, or ``10 validation folds (2 repeats × 5 folds)``."""
    words = f"{cfg.fold_count} validation folds"
    return words + (f" ({cfg.repeats} repeats × {cfg.folds} folds)" if cfg.repeats > 1 else "")


def data_section(s: Sources) -> list[Block]:
    """Heading "Data": the data set, images per class and part, preprocessing and augmentation."""
    cfg, class_names = s.data_cfg, s.class_names
    splits, train, test = data_parts(s)
    part = splits["split"].eq("test").map({True: "hold-out", False: "training"})
    counts = splits.groupby(["label", part]).size().unstack(fill_value=0)
    count_rows = [
        [name, str(counts.loc[name].get("training", 0)), str(counts.loc[name].get("hold-out", 0)), str(counts.loc[name].sum())]
        for name in class_names
    ]
    count_rows.append(["total", str(len(train)), str(len(test)), str(len(splits))])
    dataset_inputs = s.teacher.inputs.dataset_inputs if s.teacher.inputs else []
    dataset_name = dataset_inputs[0].dataset.name if dataset_inputs else s.teacher.data.params.get("data_source", "")
    params = s.teacher.data.params
    return [
        Heading(2, "Data"),
        para(
            f"The data set is {dataset_name} (source type {params.get('data_source')}, read from ",
            Code(data_label(params["data_dir"])) if params.get("data_dir") else "the embedded synthetic generator",
            f") with {len(splits)} images in {len(class_names)} classes ({', '.join(class_names)})"
            + (f"; the positive class is {params.get('positive')}" if s.binary else "; metrics are macro-averaged over classes")
            + f". Raw image sizes: {image_size_range(splits['path'].tolist())}. "
            "The data digest (SHA-256 over every file's hash, label and group) is ",
            Code(s.promote.data.tags.get(RunTag.DATA_DIGEST, s.teacher.data.tags.get(RunTag.DATA_DIGEST, ""))),
            ".",
        ),
        table(
            "class-counts",
            "Images per class in the training part (cross-validated) and the hold-out test split.",
            ["class", "training", "hold-out", "total"],
            count_rows,
        ),
        para(
            "Preprocessing: each image is decoded to grey levels, cropped to the bounding box of the head "
            "(ignoring dark background and scanner annotations), "
            f"padded to a square with its background level, resized bilinearly to {cfg.image_size} × {cfg.image_size} pixels "
            "and standardised per image (zero mean, unit variance). "
            f"Augmentation: {augmentation_description(cfg)}."
        ),
    ]


def split_section(s: Sources) -> list[Block]:
    """Heading "Split protocol": the hold-out split, the folds and the grouping of near-identical images."""
    cfg = s.data_cfg
    splits, train, test = data_parts(s)
    dropped = int((s.splits["split"] == "dropped").sum())
    # the first repeat's assignment is column "split", each later repeat's "split_repeat_<r>"
    assignments = [column for column in splits.columns if column == "split" or column.startswith("split_repeat_")]
    straddling = int(pd.concat([splits.groupby("group")[column].nunique() > 1 for column in assignments], axis=1).any(axis=1).sum())
    return [
        Heading(2, "Split protocol"),
        para(
            f"A hold-out test split of {len(test)} images ({len(test) / len(splits):.1%}; requested fraction {cfg.test_fraction:g}) "
            "was set aside with a stratified group split, "
            f"and the remaining {len(train)} images were divided by stratified group {cfg.folds}-fold cross-validation (seed {cfg.seed})"
            + (
                f", repeated {cfg.repeats} times with fold seeds derived from it and the repeat number ({cfg.fold_count} validation folds)"
                if cfg.repeats > 1
                else ""
            )
            + ". "
            + (
                f"{dropped} hold-out images that duplicated training images (identical or near-identical) were left out of every part. "
                if dropped
                else ""
            )
            + "Identical and near-identical files (by a perceptual hash) form one group "
            f"({splits['group'].nunique()} groups for {len(splits)} images), and groups never straddle the hold-out split or two folds"
            + (" of one repeat " if cfg.repeats > 1 else " ")
            + f"(checked on the logged assignment: {straddling} groups straddle). "
            "Every model was selected on the folds only; the hold-out split was used once, for the final comparison."
        ),
    ]


def teacher_description(s: Sources) -> str:
    """The teacher in words: its architecture, model, parameters and layers, or each member of an ensemble with its
    own cross-validated F1 and what the student distils from (their mean logits)."""
    described = [
        f"{run.data.params.get('teacher_arch')} ({model.name}), {_int_metric(run, 'teacher_params')} parameters; "
        f"layers: {layer_counts(model)}"
        for run, model in zip(s.teacher_members, s.models.teachers.values())
    ]
    if not s.ensemble:
        return f"Teacher: {described[0]}. "
    members = "; ".join(
        f"({i}) {text}; seed offset {run.data.params.get('teacher_seed_offset', '0')}, "
        f"k-fold F1 {num(run.data.metrics.get(Metric.F1_MEAN, float('nan')))} ± {num(run.data.metrics.get(Metric.F1_STD, float('nan')))}"
        for i, (run, text) in enumerate(zip(s.teacher_members, described), start=1)
    )
    return (
        f"Teacher: an ensemble of {len(described)} teachers, each trained on the same folds and training part; the student distils "
        f"from the mean of their logits, and the teacher's k-fold and hold-out numbers below are those of that mean. Members: {members}. "
    )


def architecture_section(s: Sources) -> list[Block]:
    """Heading "Architectures": teacher (or each member of an ensemble) and student, with the student's layers."""
    width, depth = s.trial.data.params["width"], s.trial.data.params["depth"]
    teacher_params = sum(_int_metric(run, "teacher_params") for run in s.teacher_members)
    student_params = _int_metric(s.promote, "student_params")
    return [
        Heading(2, "Architectures"),
        para(
            teacher_description(s) + f"Student: a plain CNN of {depth} blocks ({block_description(s.models.student)}) "
            f"with first-block width {width} doubling per block, "
            f"average and max global pooling side by side, dropout and a dense logit layer; {student_params} parameters "
            f"({teacher_params / max(student_params, 1):.1f} times fewer than the teacher). "
            + (
                "Two classes use a single logit z with the sigmoid."
                if s.binary
                else f"The {len(s.class_names)} classes use one logit each with the softmax."
            )
        ),
        table(
            "student-layers",
            f"Layers of the student ({s.models.student.name}).",
            ["layer", "type", "output shape", "parameters"],
            layer_rows(s.models.student),
        ),
    ]


def distillation_section(s: Sources) -> list[Block]:
    """Heading "Knowledge distillation": the loss, the selected temperature and weight, and the class weights."""
    from pipelines.training.fit import class_weights

    class_names, student = s.class_names, s.student_cfg
    _, train, _ = data_parts(s)
    label_index = {name: i for i, name in enumerate(class_names)}
    weights = class_weights(train["label"].map(label_index).to_numpy(), len(class_names))
    return [
        Heading(2, "Knowledge distillation"),
        para(
            "The student is trained on the loss below, with student logits z, cached teacher logits ",
            Math("z^{t}"),
            " (computed once per fold by that fold's teacher), temperature T and hard-loss weight ",
            Math(r"\alpha"),
            "; the sums run over a mini-batch and ",
            Math("w_{y}"),
            " is the class weight of label y."
            + (
                " With one logit, the two-class softmax of [0, z] is the sigmoid, so the KL term is the Bernoulli KL divergence."
                if s.binary
                else ""
            ),
        ),
        Equation(kd_equation(s.binary)),
        para(
            "The selected configuration uses ",
            Math(f"T = {num(student.temperature)}"),
            " and ",
            Math(rf"\alpha = {num(student.alpha)}"),
            ". The no-KD baseline is the same student trained with ",
            Math(r"\alpha = 1"),
            " (hard labels only). Class weights are balanced, ",
            Math(r"w_c = n / (k\, n_c)"),
            ", computed on each training set; on the whole training part they are "
            + ", ".join(f"{name} {num(w)}" for name, w in zip(class_names, weights))
            + ".",
        ),
    ]


def optimisation_section(s: Sources) -> list[Block]:
    """Heading "Optimisation": optimiser, batch size, learning-rate schedule, early stopping and the final models' epochs,
    worded by :func:`pipelines.training.fit.describe_optimiser` from the runs' Configs."""
    from pipelines.training.fit import describe_optimiser

    cfg, student = s.data_cfg, s.student_cfg
    client = MlflowClient()
    student_epochs = len(client.get_metric_history(s.promote.info.run_id, "student_all_loss"))
    no_kd_epochs = len(client.get_metric_history(s.promote.info.run_id, "no_kd_all_loss"))
    return [
        Heading(2, "Optimisation"),
        para(
            f"The teacher was trained with {describe_optimiser(cfg)}; the student with {describe_optimiser(student)}; "
            f"at most {cfg.epochs} epochs per fold with early stopping on the validation loss (patience {cfg.patience}, best "
            "weights restored). "
            "The final models were trained on the whole training part for a fixed number of epochs "
            "(the median best epoch of the folds): teacher "
            f"{', '.join(str(_int_metric(run, 'all_data_epochs')) for run in s.teacher_members)}, "
            f"KD student {student_epochs}, no-KD student {no_kd_epochs}."
        ),
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


# ---------------------------------------------------------------- what the methods read from runs, files, models and the study


def _int_metric(run: Run, name: str) -> int:
    if name not in run.data.metrics:
        raise PipelineError(f"run {run.info.run_id} has no metric {name!r}; it was logged by an older version, rerun the step")
    return int(run.data.metrics[name])


def image_size_range(paths: list[str]) -> str:
    """Raw image sizes read from the files' headers, or why they could not be read."""
    from PIL import Image

    sizes = []
    for path in paths:
        if Path(path).suffix.lower() == ".h5":
            return "stored as HDF5 slices (see the BraTS source)"
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except OSError:
            return "not available (the files are no longer at their recorded paths)"
    widths, heights = np.array(sizes).T
    if widths.min() == widths.max() and heights.min() == heights.max():
        return f"all {widths[0]} × {heights[0]} px"
    wide, high = (
        f"{value_range(widths)} px wide (median {int(np.median(widths))})",
        f"{value_range(heights)} px high (median {int(np.median(heights))})",
    )
    return f"{wide} × {high}"


def value_range(values: np.ndarray) -> str:
    """``a–b``, or one value when the ends are equal."""
    return f"{values.min()}" if values.min() == values.max() else f"{values.min()}–{values.max()}"


def augmentation_description(cfg: Config) -> str:
    """The augmentation and its ranges, read from the constants the training views are made with (pipelines/training/views.py)."""
    if not cfg.augment:
        return "none (augment = false)"
    from pipelines.training.views import CONTRAST, ROTATION, SHIFT, ZOOM

    return (
        f"random left-right flip, rotation up to ±{ROTATION} turns, zoom ±{ZOOM:.0%}, shift up to ±{SHIFT:.0%} of the side "
        f"(borders filled with the nearest pixel) and contrast ×(1 ± {CONTRAST}), each a stateless function of the image and a "
        "per-epoch draw from the seed (training batches only)"
    )


def layer_rows(model) -> list[list[str]]:
    """Name, type, output shape and parameter count of each layer."""
    return [[layer.name, type(layer).__name__, str(tuple(layer.output.shape[1:])), str(layer.count_params())] for layer in model.layers]


def layer_counts(model) -> str:
    """How many layers of each type, the most frequent first (``12 Conv2D, 4 BatchNormalization, ...``)."""
    counts: dict[str, int] = {}
    for layer in model.layers:
        counts[type(layer).__name__] = counts.get(type(layer).__name__, 0) + 1
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda item: -item[1]))


def block_description(model) -> str:
    """Kernel and pooling sizes read from the student's first convolution and pooling layers."""
    import keras

    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    pool = next(layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D))
    (kh, kw), (ph, pw) = conv.kernel_size, pool.pool_size
    return f"{kh} × {kw} convolution, group normalisation, ReLU, {ph} × {pw} max-pooling"


def kd_equation(binary: bool) -> str:
    """The distillation loss in LaTeX: sigmoid and Bernoulli KL for one logit, softmax and KL for more."""
    if binary:
        hard = r"\ell_{\mathrm{BCE}}\big(y_i, \sigma(z_i)\big)"
        soft = r"\mathrm{KL}\Big(\mathrm{Bern}\big(\sigma(z^{t}_i/T)\big)\,\Big\|\,\mathrm{Bern}\big(\sigma(z_i/T)\big)\Big)"
    else:
        hard = r"\ell_{\mathrm{CE}}\big(y_i, \mathrm{softmax}(\mathbf{z}_i)\big)"
        soft = r"\mathrm{KL}\Big(\mathrm{softmax}(\mathbf{z}^{t}_i/T)\,\Big\|\,\mathrm{softmax}(\mathbf{z}_i/T)\Big)"
    return r"\mathcal{L} = \frac{\alpha \sum_i w_{y_i}\, " + hard + r" + (1-\alpha)\, T^{2} \sum_i w_{y_i}\, " + soft + r"}{\sum_i w_{y_i}}"


def search_settings(study) -> tuple[str, str]:
    """Sampler and pruner as the search code builds them (read from the objects, not restated)."""
    sampler, pruner = study.sampler, study.pruner
    # multivariate=None in TPESampler means "Optuna decides per study": print what it decided, not None.
    multivariate = sampler._is_multivariate(study) if hasattr(sampler, "_is_multivariate") else getattr(sampler, "_multivariate", "n/a")
    sampler_text = (
        f"{type(sampler).__name__} (n_startup_trials = {getattr(sampler, '_n_startup_trials', 'n/a')}, multivariate = {multivariate})"
    )
    settings = {name: getattr(pruner, f"_{name}", "n/a") for name in ("n_startup_trials", "n_warmup_steps", "percentile")}
    pruner_text = f"{type(pruner).__name__} ({', '.join(f'{name} = {value}' for name, value in settings.items())})"
    return sampler_text, pruner_text


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


# ---------------------------------------------------------------- results


def results(s: Sources, out_dir: Path, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[list[Block], dict]:
    """The results section, its figures written under ``out_dir/figures``, and every number in it (``report.json``)."""
    f = findings(s, resamples)
    figures = out_dir / "figures"
    blocks: list[Block] = [
        Heading(1, "Results"),
        kfold_table(s, f),
        holdout_table(f),
        *fold_comparison(s, f),
        per_class_table(s, f),
        per_class_f1_table(s, f),
        *holdout_figures(s, f, figures),
        *calibration_result(s, out_dir),
        importance_result(f, figures),
        gradcam_result(s, f, figures),
        *comparison_result(s.comparison, out_dir),
        card_result(s, out_dir),
    ]
    numbers = report_numbers(s, f) | {"calibration": calibration_numbers(s)}
    if s.comparison is not None:
        numbers["comparison"] = comparison_numbers(s.comparison)
    return blocks, numbers


def holdout_description(f: Findings) -> str:
    """The hold-out split in words: its size and images per class."""
    return f"{len(f.labels)} hold-out images ({', '.join(f'{n} {name}' for name, n in f.class_counts.items())})"


def kfold_table(s: Sources, f: Findings) -> Block:
    """Cross-validation metrics of the three models: mean ± standard deviation over the folds."""
    words = cross_validation_words(s.data_cfg)
    return table(
        "kfold",
        f"{words[0].upper()}{words[1:]}: mean ± standard deviation over the validation folds "
        f"({'teacher run' if not s.ensemble else 'the ensemble teacher: its mean logits on each fold'}, "
        f"best search trial {s.version.tags.get(VersionTag.TRIAL)}, no-KD run of the same student configuration).",
        ["metric"] + list(MODELS.values()),
        [[label] + [f"{num(f.kfold[who][m]['mean'])} ± {num(f.kfold[who][m]['std'])}" for who in MODELS] for m, label in METRICS.items()],
    )


def holdout_table(f: Findings) -> Block:
    """Hold-out metrics of the three models with their bootstrap intervals."""
    return table(
        "holdout",
        f"Hold-out test split ({holdout_description(f)}): value [95% bootstrap confidence interval, {f.resamples} resamples]. "
        "Teacher and students were retrained on the whole training part.",
        ["metric"] + list(MODELS.values()),
        [
            [label] + [f"{num(f.holdout[who][m])} [{num(f.intervals[who][m][0])}, {num(f.intervals[who][m][1])}]" for who in MODELS]
            for m, label in METRICS.items()
        ],
    )


def fold_comparison(s: Sources, f: Findings) -> list[Block]:
    """F1 per fold of the three models, and the paired KD vs no-KD tests on those folds."""
    cfg, per_fold, test = s.data_cfg, f.fold_f1, f.paired_test
    n = test["n"]
    # With n pairs the smallest two-sided Wilcoxon p-value is 2 / 2^n: say so when it cannot reach 0.05.
    floor = (
        f" With {n} pairs the smallest attainable two-sided Wilcoxon p-value is {num(2 / 2**n)}, "
        "so that test cannot reach significance at 0.05."
        if 2 / 2**n >= 0.05
        else ""
    )
    numbering = f"k = repeat × {cfg.folds} + fold, " if cfg.repeats > 1 else ""
    return [
        table(
            "folds",
            f"F1 per validation fold (numbered 0 to {cfg.fold_count - 1}, {numbering}as in the logs and the runs' f1_fold_<k> metrics); "
            "the KD and no-KD students share folds and initialisation seeds.",
            ["fold"] + list(MODELS.values()) + ["KD − no-KD"],
            [
                [str(k)] + [num(per_fold[who][k]) for who in MODELS] + [num(per_fold["student"][k] - per_fold["no_kd"][k])]
                for k in range(cfg.fold_count)
            ],
        ),
        para(
            f"KD vs no-KD over n = {n} paired fold scores"
            + (f" ({cfg.repeats} repeats × {cfg.folds} folds)" if cfg.repeats > 1 else "")
            + f": mean F1 difference {num(test['mean_difference'])}; "
            f"corrected resampled t-test t = {num(test['t'])}, df = {test['df']}, p = {num(test['t_pvalue'])}; "
            f"secondary: Wilcoxon signed-rank W = {num(test['wilcoxon'])}, p = {num(test['wilcoxon_pvalue'])}." + floor
        ),
    ]


def per_class_table(s: Sources, f: Findings) -> Block:
    """Per-class hold-out precision, recall and F1 of the KD student."""
    scores = per_class_scores(f.labels, f.probs["student"], len(s.class_names))
    rows = [
        [name, num(scores["precision"][i]), num(scores["recall"][i]), num(scores["f1"][i]), str(int(scores["support"][i]))]
        for i, name in enumerate(s.class_names)
    ]
    return table("per-class", "Per-class hold-out metrics of the KD student.", ["class", "precision", "recall", "F1", "images"], rows)


def per_class_f1_table(s: Sources, f: Findings) -> Block:
    """Per-class and macro F1 of the three models as their runs logged them: k-fold mean / hold-out."""
    numbers = f.per_class_f1
    rows = [
        [label] + [f"{num(numbers[who]['kfold_mean'][key])} / {num(numbers[who]['holdout'][key])}" for who in MODELS]
        for label, key in per_class_f1_rows(s.class_names)
    ]
    return table(
        "per-class-f1",
        "F1 per class and macro-F1 (unweighted mean over the classes): k-fold mean / hold-out, as logged by the runs.",
        ["class"] + list(MODELS.values()),
        rows,
    )


def holdout_figures(s: Sources, f: Findings, figures: Path) -> list[Block]:
    """Confusion matrices, ROC and precision-recall curves of the three models on the hold-out split."""
    averaged = "" if len(s.class_names) == 2 else " (micro-averaged one-vs-rest)"
    return [
        Figure(
            "confusion",
            confusion_figure(f.labels, f.probs, s.class_names, figures / "confusion-matrices.png"),
            f"Confusion matrices on the {holdout_description(f)}, arg-max decisions; rows are true classes.",
        ),
        Figure(
            "roc",
            curve_figure("roc", f.labels, f.probs, f.holdout, figures / "roc-curves.png"),
            f"ROC curves on the hold-out split{averaged}; the legend gives the logged ROC-AUC.",
        ),
        Figure(
            "pr",
            curve_figure("pr", f.labels, f.probs, f.holdout, figures / "pr-curves.png"),
            f"Precision-recall curves on the hold-out split{averaged}; the legend gives the logged PR-AUC.",
        ),
    ]


def importance_result(f: Findings, figures: Path) -> Block:
    """The search parameters' importances as a figure, or why they were not computed."""
    if not f.importances:
        return para(f"Search parameter importances: {f.importance_note}.")
    return Figure(
        "importance",
        importance_figure(f.importances, figures / "param-importances.png"),
        f"Importance of each searched hyper-parameter for the objective ({f.importance_note}): "
        + ", ".join(f"{name} {num(value)}" for name, value in f.importances.items())
        + ".",
    )


def gradcam_result(s: Sources, f: Findings, figures: Path) -> Block:
    """Grad-CAM of the KD student and the teacher on one hold-out scan per outcome, or why there is none."""
    examples = gradcam_examples(s, f.labels, f.probs["student"])
    if not examples:
        return para("Grad-CAM examples: the hold-out files are no longer at their recorded paths.")
    return Figure(
        "gradcam",
        gradcam_figure(s, examples, figures / "gradcam-holdout.png"),
        "Grad-CAM of the KD student and the teacher on hold-out scans, one per outcome of the KD student ("
        + ", ".join(o for o, _ in examples)
        + "); the map explains each model's predicted class and is drawn over the scan, "
        "except where it is zero everywhere (the panel title says so).",
    )


def comparison_result(comparison: ComparisonResults | None, out_dir: Path) -> list[Block]:
    """Section "Comparison": the KD comparison's tables and figures (``search.comparison_tables``), when the report has one."""
    if comparison is None:
        return []
    return comparison_blocks(comparison, plot_comparison(comparison, out_dir / "figures", base=out_dir, prefix="comparison-"))
