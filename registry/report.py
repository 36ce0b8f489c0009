"""Step ``report``: the methodology and results sections of a paper, written from the tracked runs.

For a registered version (by stage or alias) it reads the promote run, the teacher run, the best trial's run,
the no-KD cross-validation run and the Optuna study, and writes ``methodology.{md,tex}``, ``results.{md,tex}``,
a standalone ``report.tex``, ``report.json`` (every number used) and ``figures/`` into a folder, then logs the
folder as artifacts (``report/``) of the version's run. Every number comes from the tracking store, the
registry, the study or the stored artifacts (models, data manifest, hold-out predictions); none is typed in.

``promote`` calls :func:`log_evidence` so the store holds what the report needs: per-image hold-out
probabilities (for bootstrap CIs, confusion matrices, curves), a k-fold no-KD run on the trial's folds (for
the paired test) and the software and hardware it ran on.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from pipelines.config import PROJECT_ROOT, STORAGE_URL_ENV, Config, PipelineError, build_parser, config_from_args
from pipelines.evaluate import classification_metrics, save_figure
from registry.document import Block, Code, Equation, Figure, Heading, Math, bullets, latex_document, para, table, to_latex, to_markdown
from registry.evidence import ENVIRONMENT_ARTIFACT, NO_KD_CV_TAG, PREDICTIONS_ARTIFACT, TRIAL_RUN_TAG

MODELS = {"teacher": "Teacher", "student": "KD student", "no_kd": "No-KD student"}
METRICS = {
    "f1": "F1",
    "accuracy": "Accuracy",
    "precision": "Precision",
    "recall": "Recall (sensitivity)",
    "specificity": "Specificity",
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC",
}
BOOTSTRAP_RESAMPLES = 1000


# ---------------------------------------------------------------- reading the store


@dataclass
class Sources:
    """Everything the report is written from, fetched once."""

    model_name: str
    version: object  # ModelVersion
    promote: Run
    teacher: Run
    trial: Run
    no_kd: Run
    search: Run
    splits: pd.DataFrame  # the teacher run's data/splits.csv
    predictions: pd.DataFrame  # the promote run's hold-out probabilities
    environment: dict
    data_cfg: Config  # the teacher run's data and training parameters
    student_cfg: Config  # the no-KD CV run's parameters: the trial's student configuration
    study: object | None  # optuna.Study, None when its storage is unreachable
    study_note: str
    models: object  # registry.explain.RegisteredModels
    selector: str = ""  # how the version was chosen, as `mlflow run -e report` parameters (-P stage=... or -P alias=...)

    @property
    def class_names(self) -> list[str]:
        return self.teacher.data.params["classes"].split(",")


def run_config(run: Run) -> Config:
    """A run's logged parameters read back into a Config through the CLI's own parsers (other params ignored)."""
    known = {f.name for f in fields(Config)}
    argv = [f"--{name}={value}" for name, value in run.data.params.items() if name in known]
    return config_from_args(build_parser("logged parameters").parse_args(argv))


def _artifact(run_id: str, path: str, tmp: str) -> Path:
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp))
    except Exception as error:  # MLflow raises several types for a missing artifact
        raise PipelineError(
            f"run {run_id} has no artifact {path!r} ({type(error).__name__}); promote the model again to record it"
        ) from None


def open_study(search: Run, storage: str) -> tuple[object | None, str]:
    """The study the trial came from, or None with the reason (the report then says what it could not read)."""
    from search.tune import load_or_create_study, open_storage

    cfg = run_config(search)
    from_environment = os.environ.get(STORAGE_URL_ENV, "")
    url = storage or from_environment or search.data.tags.get("optuna.storage", "")
    if not url or "***" in url:
        return None, f"the study's storage URL is not recorded in full (tag optuna.storage = {url!r}); pass storage=..."
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None, f"the study's storage {url} does not exist here; pass storage=..."
    cfg = cfg.replace(storage="" if url == from_environment else url)  # the environment's URL may carry a password: never a parameter
    storage_object = open_storage(cfg)
    try:
        storage_object.get_study_id_from_name(cfg.study_name)
    except KeyError:
        return None, f"no study {cfg.study_name!r} in {url}"
    study, _ = load_or_create_study(cfg, storage_object)
    return study, ""


def gather(model_name: str, stage: str | None, alias: str | None, storage: str = "") -> Sources:
    """Fetch the version, its runs, artifacts, models and study."""
    from registry.explain import load_models
    from registry.fetch import resolve_version

    client = MlflowClient()
    version = resolve_version(model_name, stage, alias)
    promote = client.get_run(version.run_id)
    missing = [tag for tag in (NO_KD_CV_TAG, TRIAL_RUN_TAG) if not promote.data.tags.get(tag)]
    if missing or not version.tags.get("teacher_run_id"):
        raise PipelineError(
            f"{model_name} v{version.version} was promoted before reports existed (its run lacks {missing or ['teacher_run_id']}); promote it again"
        )
    teacher = client.get_run(version.tags["teacher_run_id"])
    trial = client.get_run(promote.data.tags[TRIAL_RUN_TAG])
    no_kd = client.get_run(promote.data.tags[NO_KD_CV_TAG])
    search = client.get_run(trial.data.tags["mlflow.parentRunId"])
    with tempfile.TemporaryDirectory() as tmp:
        # Labels and groups stay text: class names such as "0" and "1" must not become numbers.
        text = {"path": str, "label": str, "group": str, "sha256": str, "split": str}
        splits = pd.read_csv(_artifact(teacher.info.run_id, "data/splits.csv", tmp), dtype=text, keep_default_na=False)
        predictions = pd.read_csv(_artifact(promote.info.run_id, PREDICTIONS_ARTIFACT, tmp), dtype=text, keep_default_na=False)
        env = json.loads(_artifact(promote.info.run_id, ENVIRONMENT_ARTIFACT, tmp).read_text())
    study, note = open_study(search, storage)
    selector = f"-P alias={alias}" if alias else f"-P stage={stage}"
    return Sources(
        model_name,
        version,
        promote,
        teacher,
        trial,
        no_kd,
        search,
        splits,
        predictions,
        env,
        run_config(teacher),
        run_config(no_kd),
        study,
        note,
        load_models(model_name, version),
        selector,
    )


# ---------------------------------------------------------------- formatting


def num(value: float, digits: int = 4) -> str:
    """A metric as printed everywhere in the report (tests parse it back at this precision)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def mean_std(run: Run, metric: str) -> str:
    return f"{num(run.data.metrics.get(f'{metric}_mean', math.nan))} ± {num(run.data.metrics.get(f'{metric}_std', math.nan))}"


def _int_metric(run: Run, name: str) -> int:
    if name not in run.data.metrics:
        raise PipelineError(f"run {run.info.run_id} has no metric {name!r}; it was logged by an older version, rerun the step")
    return int(run.data.metrics[name])


# ---------------------------------------------------------------- methodology


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
    return f"{value_range(widths)} px wide (median {int(np.median(widths))}) × {value_range(heights)} px high (median {int(np.median(heights))})"


def value_range(values: np.ndarray) -> str:
    """``a–b``, or one value when the ends are equal."""
    return f"{values.min()}" if values.min() == values.max() else f"{values.min()}–{values.max()}"


def augmentation_description(cfg: Config) -> str:
    """The augmentation layers and their factors, read from the layers the training code builds."""
    if not cfg.augment:
        return "none (augment = false)"
    from pipelines.training import augmentation

    parts = []
    for layer in augmentation(cfg.seed).layers:
        config = layer.get_config()
        settings = {key: config[key] for key in ("mode", "factor", "height_factor", "width_factor", "fill_mode") if key in config}
        parts.append(f"{type(layer).__name__}({', '.join(f'{k}={v}' for k, v in settings.items())})")
    return "; ".join(parts) + " (training batches only)"


def layer_rows(model) -> list[list[str]]:
    return [[layer.name, type(layer).__name__, str(tuple(layer.output.shape[1:])), str(layer.count_params())] for layer in model.layers]


def layer_counts(model) -> str:
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
    pruner_text = f"{type(pruner).__name__} (n_startup_trials = {getattr(pruner, '_n_startup_trials', 'n/a')}, n_warmup_steps = {getattr(pruner, '_n_warmup_steps', 'n/a')}, percentile = {getattr(pruner, '_percentile', 'n/a')})"
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


def methodology(s: Sources, resamples: int = BOOTSTRAP_RESAMPLES) -> list[Block]:
    cfg, student = s.data_cfg, s.student_cfg
    # Hold-out images that duplicated training images and were left out of every part (dedupe=drop) are in no count.
    dropped, splits = int((s.splits["split"] == "dropped").sum()), s.splits[s.splits["split"] != "dropped"]
    class_names = s.class_names
    binary = len(class_names) == 2
    test, train = splits[splits["split"] == "test"], splits[splits["split"] != "test"]
    counts = splits.groupby(["label", splits["split"].eq("test").map({True: "hold-out", False: "training"})]).size().unstack(fill_value=0)
    count_rows = [
        [name, str(counts.loc[name].get("training", 0)), str(counts.loc[name].get("hold-out", 0)), str(counts.loc[name].sum())]
        for name in class_names
    ]
    count_rows.append(["total", str(len(train)), str(len(test)), str(len(splits))])
    straddling = int((splits.groupby("group")["split"].nunique() > 1).sum())
    from pipelines.training import class_weights

    label_index = {name: i for i, name in enumerate(class_names)}
    weights = class_weights(train["label"].map(label_index).to_numpy(), len(class_names))
    width, depth = (s.trial.data.params["width"], s.trial.data.params["depth"])
    teacher_params, student_params = _int_metric(s.teacher, "teacher_params"), _int_metric(s.promote, "student_params")
    client = MlflowClient()
    student_epochs = len(client.get_metric_history(s.promote.info.run_id, "student_all_loss"))
    no_kd_epochs = len(client.get_metric_history(s.promote.info.run_id, "no_kd_all_loss"))
    dataset_inputs = s.teacher.inputs.dataset_inputs if s.teacher.inputs else []
    dataset_name = dataset_inputs[0].dataset.name if dataset_inputs else s.teacher.data.params.get("data_source", "")
    env = s.environment

    blocks: list[Block] = [
        Heading(1, "Methods"),
        Heading(2, "Data"),
        para(
            f"The data set is {dataset_name} (source type {s.teacher.data.params.get('data_source')}, read from ",
            Code(s.teacher.data.params["data_dir"]) if s.teacher.data.params.get("data_dir") else "the embedded synthetic generator",
            f") with {len(splits)} images in {len(class_names)} classes ({', '.join(class_names)})"
            + (
                f"; the positive class is {s.teacher.data.params.get('positive')}"
                if binary
                else "; metrics are macro-averaged over classes"
            )
            + f". Raw image sizes: {image_size_range(splits['path'].tolist())}. The data digest (SHA-256 over every file's hash, label and group) is ",
            Code(s.promote.data.tags.get("kd.data_digest", s.teacher.data.tags.get("kd.data_digest", ""))),
            ".",
        ),
        table(
            "class-counts",
            "Images per class in the training part (cross-validated) and the hold-out test split.",
            ["class", "training", "hold-out", "total"],
            count_rows,
        ),
        para(
            f"Preprocessing: each image is decoded to grey levels, cropped to the bounding box of the head (ignoring dark background and scanner annotations), "
            f"padded to a square with its background level, resized bilinearly to {cfg.image_size} × {cfg.image_size} pixels and standardised per image (zero mean, unit variance). "
            f"Augmentation: {augmentation_description(cfg)}."
        ),
        Heading(2, "Split protocol"),
        para(
            f"A hold-out test split of {len(test)} images ({len(test) / len(splits):.1%}; requested fraction {cfg.test_fraction:g}) was set aside with a stratified group split, "
            f"and the remaining {len(train)} images were divided by stratified group {cfg.folds}-fold cross-validation (seed {cfg.seed}). "
            + (
                f"{dropped} hold-out images that duplicated training images (identical or near-identical) were left out of every part. "
                if dropped
                else ""
            )
            + f"Identical and near-identical files (by a perceptual hash) form one group ({splits['group'].nunique()} groups for {len(splits)} images), and groups never straddle the hold-out split or two folds "
            f"(checked on the logged assignment: {straddling} groups straddle). Every model was selected on the folds only; the hold-out split was used once, for the final comparison."
        ),
        Heading(2, "Architectures"),
        para(
            f"Teacher: {s.teacher.data.params.get('teacher_arch')} ({s.models.teacher.name}), {teacher_params} parameters; layers: {layer_counts(s.models.teacher)}. "
            f"Student: a plain CNN of {depth} blocks ({block_description(s.models.student)}) with first-block width {width} doubling per block, "
            f"average and max global pooling side by side, dropout and a dense logit layer; {student_params} parameters "
            f"({teacher_params / max(student_params, 1):.1f} times fewer than the teacher). "
            + (
                "Two classes use a single logit z with the sigmoid."
                if binary
                else f"The {len(class_names)} classes use one logit each with the softmax."
            )
        ),
        table(
            "student-layers",
            f"Layers of the student ({s.models.student.name}).",
            ["layer", "type", "output shape", "parameters"],
            layer_rows(s.models.student),
        ),
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
                if binary
                else ""
            ),
        ),
        Equation(kd_equation(binary)),
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
        Heading(2, "Optimisation"),
        para(
            f"All models were trained with Adam, batch size {cfg.batch_size}, at most {cfg.epochs} epochs per fold with early stopping on the validation loss (patience {cfg.patience}, best weights restored). "
            f"Learning rate: teacher {cfg.learning_rate:g}, student {student.learning_rate:.4g}. The final models were trained on the whole training part for a fixed number of epochs "
            f"(the median best epoch of the folds): teacher {_int_metric(s.teacher, 'all_data_epochs')}, KD student {student_epochs}, no-KD student {no_kd_epochs}."
        ),
    ]
    blocks += search_section(s)
    blocks += [
        Heading(2, "Metrics"),
        para(
            "With TP, FP, TN and FN the true/false positives/negatives of "
            + ("the positive class" if binary else "each class (one-vs-rest, then averaged over classes)")
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
            f"k-fold results are mean ± sample standard deviation over the {cfg.folds} validation folds. Hold-out 95% confidence intervals are percentile intervals of "
            f"{resamples} paired bootstrap resamples of the {len(test)} hold-out images (seed {cfg.seed}). KD and no-KD are compared with a paired t-test and a "
            "Wilcoxon signed-rank test on the per-fold F1 (same folds, same initialisation seeds)."
        ),
        Heading(2, "Software and hardware"),
        para(
            f"Final training ran on {env.get('cpu')} ({env.get('cpu_count')} logical CPUs, {env.get('memory_gib')} GiB memory; GPUs: {', '.join(env.get('gpus') or []) or 'none'}), "
            f"{env.get('platform')}, Python {env.get('python')}, with "
            + ", ".join(f"{name} {version}" for name, version in env.get("packages", {}).items())
            + "."
        ),
        Heading(2, "Reproducibility"),
        bullets(
            (
                "model: ",
                Code(f"models:/{s.model_name}/{s.version.version}"),
                f" ({s.version.current_stage}), code version ",
                Code(s.version.tags.get("code_version", "unknown")),
            ),
            ("data digest: ", Code(s.version.tags.get("data_digest", ""))),
            (
                "teacher run ",
                Code(s.teacher.info.run_id),
                ", search run ",
                Code(s.search.info.run_id),
                ", best trial run ",
                Code(s.trial.info.run_id),
                f" (trial {s.version.tags.get('trial')})",
            ),
            ("no-KD cross-validation run ", Code(s.no_kd.info.run_id), ", promote run ", Code(s.promote.info.run_id)),
            ("rerun: ", Code(rerun_command(s))),
            ("this report: ", Code(f"mlflow run . -e report --env-manager local -P model_name={s.model_name} {s.selector}")),
        ),
    ]
    return blocks


def search_section(s: Sources) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Hyper-parameter search")]
    params = s.search.data.params
    objectives = params.get("objectives", "f1")
    objective = "the mean k-fold F1 of the distilled student (maximised)" + (
        "" if objectives == "f1" else f", and {objectives.split(',')[1]} (minimised) as a second objective"
    )
    if s.study is None:
        return blocks + [
            para(
                f"Optuna study {params.get('study_name')!r} with {params.get('n_trials')} trials; objective: {objective}. The study itself could not be read: {s.study_note}."
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
            f"Optuna study {s.study.study_name!r}: objective {objective}. Sampler {sampler}, seeded with {seed} by the worker that created the study; pruner {pruner}, "
            f"fed each fold's F1. Trials: "
            + ", ".join(f"{n} {state}" for state, n in states.items() if n)
            + f" (target: {params.get('n_trials')} finished). "
            f"Each trial cross-validated a student on the same {s.data_cfg.folds} folds with the teachers' cached logits. The best trial ({s.version.tags.get('trial')}) was retrained on the whole training part."
        ),
        table(
            "search-space",
            "Search space (from the study's trial distributions).",
            ["parameter", "type", "low", "high", "scale", "step"],
            search_space_rows(s.study),
        ),
    ]
    return blocks


# ---------------------------------------------------------------- results


def holdout_arrays(s: Sources) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Hold-out labels (class indices) and each model's class probabilities, from the logged table."""
    frame, class_names = s.predictions, s.class_names
    labels = frame["label"].map({name: i for i, name in enumerate(class_names)}).to_numpy(np.int64)
    probs = {who: frame[[f"{who}_prob_{name}" for name in class_names]].to_numpy(np.float64) for who in MODELS}
    return labels, probs


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


def fold_f1(run: Run, folds: int) -> list[float]:
    missing = [k for k in range(folds) if f"f1_fold_{k}" not in run.data.metrics]
    if missing:
        raise PipelineError(f"run {run.info.run_id} has no F1 for fold(s) {missing}; the paired test needs every fold")
    return [run.data.metrics[f"f1_fold_{k}"] for k in range(folds)]


def paired_test(kd: list[float], no_kd: list[float]) -> dict[str, float]:
    """Paired t-test and Wilcoxon signed-rank test of KD vs no-KD per-fold F1 (two-sided)."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identical folds give NaN statistics, reported as n/a
        t = stats.ttest_rel(kd, no_kd)
        w = stats.wilcoxon(kd, no_kd)
    return {
        "mean_difference": float(np.mean(np.subtract(kd, no_kd))),
        "t": float(t.statistic),
        "t_pvalue": float(t.pvalue),
        "wilcoxon": float(w.statistic),
        "wilcoxon_pvalue": float(w.pvalue),
    }


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    """Write the figure; returns its path relative to the report folder, as the documents cite it."""
    save_figure(fig, path, dpi=130)
    return f"{path.parent.name}/{path.name}"


def confusion_figure(labels: np.ndarray, probs: dict[str, np.ndarray], class_names: list[str], path: Path) -> str:
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, axes = _plt().subplots(1, len(probs), figsize=(4.2 * len(probs), 3.8))
    for ax, (who, p) in zip(np.ravel(axes), probs.items()):
        ConfusionMatrixDisplay.from_predictions(
            labels, p.argmax(axis=1), labels=np.arange(len(class_names)), display_labels=class_names, ax=ax, colorbar=False
        )
        ax.set_title(MODELS[who])
    return _save(fig, path)


def curve_figure(kind: str, labels: np.ndarray, probs: dict[str, np.ndarray], holdout: dict[str, dict[str, float]], path: Path) -> str:
    """ROC or PR curves of the three models: the positive class (binary) or micro-averaged one-vs-rest."""
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    display, metric = (RocCurveDisplay, "roc_auc") if kind == "roc" else (PrecisionRecallDisplay, "pr_auc")
    fig, ax = _plt().subplots(figsize=(5, 4.3))
    for who, p in probs.items():
        if p.shape[1] == 2:
            truth, score = labels == 1, p[:, 1]
        else:
            truth, score = np.eye(p.shape[1], dtype=bool)[labels].ravel(), p.ravel()
        display.from_predictions(truth, score, name=f"{MODELS[who]} ({METRICS[metric]} {num(holdout[who][metric])})", ax=ax)
    ax.set_title("ROC curves" if kind == "roc" else "Precision-recall curves")
    return _save(fig, path)


def importance_figure(importances: dict[str, float], path: Path) -> str:
    fig, ax = _plt().subplots(figsize=(5.5, 3.2))
    names = list(importances)[::-1]
    ax.barh(names, [importances[name] for name in names], color="tab:blue")
    ax.set_xlabel("importance for the objective (PED-ANOVA, as optuna-dashboard)")
    return _save(fig, path)


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


def gradcam_examples(s: Sources, labels: np.ndarray, probs: np.ndarray) -> list[tuple[str, Path]]:
    """The KD student's most confident hold-out example of each outcome whose file is still there."""
    from pipelines.data import row_file

    predicted = probs.argmax(axis=1)
    if probs.shape[1] == 2:
        outcomes = {
            "true positive": (labels == 1) & (predicted == 1),
            "false positive": (labels == 0) & (predicted == 1),
            "false negative": (labels == 1) & (predicted == 0),
            "true negative": (labels == 0) & (predicted == 0),
        }
    else:
        outcomes = {"correct": labels == predicted, "misclassified": labels != predicted}
    paths = s.predictions["path"].map(lambda p: row_file(p).is_file()).to_numpy()
    confidence = probs.max(axis=1)
    examples = []
    for outcome, rows in outcomes.items():
        candidates = np.flatnonzero(rows & paths)
        if candidates.size:
            examples.append((outcome, Path(s.predictions["path"].iloc[candidates[np.argmax(confidence[candidates])]])))
    return examples


def results(s: Sources, out_dir: Path, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[list[Block], dict]:
    """The results section and every number in it (``report.json``)."""
    from registry.explain import explanation_grid

    class_names, folds = s.class_names, s.data_cfg.folds
    labels, probs = holdout_arrays(s)
    runs = {"teacher": s.teacher, "student": s.trial, "no_kd": s.no_kd}
    kfold = {
        who: {m: {"mean": run.data.metrics.get(f"{m}_mean", math.nan), "std": run.data.metrics.get(f"{m}_std", math.nan)} for m in METRICS}
        for who, run in runs.items()
    }
    holdout = {who: {m: s.promote.data.metrics.get(f"holdout_{who}_{m}", math.nan) for m in METRICS} for who in MODELS}
    intervals = bootstrap_intervals(labels, probs, resamples, s.data_cfg.seed)
    per_fold = {"teacher": fold_f1(s.teacher, folds), "student": fold_f1(s.trial, folds), "no_kd": fold_f1(s.no_kd, folds)}
    test = paired_test(per_fold["student"], per_fold["no_kd"])
    importances, importance_note = param_importances(s)
    n_class = {name: int((labels == i).sum()) for i, name in enumerate(class_names)}
    holdout_text = f"{len(labels)} hold-out images ({', '.join(f'{n} {name}' for name, n in n_class.items())})"

    figures = out_dir / "figures"
    blocks: list[Block] = [
        Heading(1, "Results"),
        table(
            "kfold",
            f"Stratified group {folds}-fold cross-validation: mean ± standard deviation over the validation folds "
            f"(teacher run, best search trial {s.version.tags.get('trial')}, no-KD run of the same student configuration).",
            ["metric"] + list(MODELS.values()),
            [[label] + [mean_std(runs[who], m) for who in MODELS] for m, label in METRICS.items()],
        ),
        table(
            "holdout",
            f"Hold-out test split ({holdout_text}): value [95% bootstrap confidence interval, {resamples} resamples]. "
            "Teacher and students were retrained on the whole training part.",
            ["metric"] + list(MODELS.values()),
            [
                [label] + [f"{num(holdout[who][m])} [{num(intervals[who][m][0])}, {num(intervals[who][m][1])}]" for who in MODELS]
                for m, label in METRICS.items()
            ],
        ),
        table(
            "folds",
            f"F1 per validation fold (numbered 0 to {folds - 1}, as in the logs and the runs' f1_fold_<k> metrics); the KD and no-KD students share folds and initialisation seeds.",
            ["fold"] + list(MODELS.values()) + ["KD − no-KD"],
            [
                [str(k)] + [num(per_fold[who][k]) for who in MODELS] + [num(per_fold["student"][k] - per_fold["no_kd"][k])]
                for k in range(folds)
            ],
        ),
        para(
            f"KD vs no-KD across the {folds} folds: mean F1 difference {num(test['mean_difference'])}; paired t-test t = {num(test['t'])}, p = {num(test['t_pvalue'])}; "
            f"Wilcoxon signed-rank W = {num(test['wilcoxon'])}, p = {num(test['wilcoxon_pvalue'])}."
            + (
                f" With {folds} folds the smallest attainable two-sided Wilcoxon p-value is {num(2 / 2**folds)}, so this test cannot reach significance at 0.05."
                if 2 / 2**folds >= 0.05
                else ""
            )
        ),
        per_class_table(labels, probs["student"], class_names),
        per_class_f1_table(s, runs),
        Figure(
            "confusion",
            confusion_figure(labels, probs, class_names, figures / "confusion-matrices.png"),
            f"Confusion matrices on the {holdout_text}, arg-max decisions; rows are true classes.",
        ),
        Figure(
            "roc",
            curve_figure("roc", labels, probs, holdout, figures / "roc-curves.png"),
            "ROC curves on the hold-out split"
            + ("" if len(class_names) == 2 else " (micro-averaged one-vs-rest)")
            + "; the legend gives the logged ROC-AUC.",
        ),
        Figure(
            "pr",
            curve_figure("pr", labels, probs, holdout, figures / "pr-curves.png"),
            "Precision-recall curves on the hold-out split"
            + ("" if len(class_names) == 2 else " (micro-averaged one-vs-rest)")
            + "; the legend gives the logged PR-AUC.",
        ),
    ]
    if importances:
        blocks += [
            Figure(
                "importance",
                importance_figure(importances, figures / "param-importances.png"),
                f"Importance of each searched hyper-parameter for the objective ({importance_note}): "
                + ", ".join(f"{name} {num(value)}" for name, value in importances.items())
                + ".",
            ),
        ]
    else:
        blocks.append(para(f"Search parameter importances: {importance_note}."))
    examples = gradcam_examples(s, labels, probs["student"])
    if examples:
        blocks.append(
            Figure(
                "gradcam",
                f"figures/{explanation_grid(s.models, examples, figures / 'gradcam-holdout.png').name}",
                "Grad-CAM of the KD student and the teacher on hold-out scans, one per outcome of the KD student ("
                + ", ".join(o for o, _ in examples)
                + "); the map explains each model's predicted class and is drawn over the scan, except where it is zero everywhere (the panel title says so).",
            )
        )
    else:
        blocks.append(para("Grad-CAM examples: the hold-out files are no longer at their recorded paths."))
    numbers = {
        "model": s.model_name,
        "version": s.version.version,
        "kfold": kfold,
        "holdout": holdout,
        "holdout_ci95": {who: {m: list(v) for m, v in by.items()} for who, by in intervals.items()},
        "fold_f1": per_fold,
        "paired_test": test,
        "param_importances": importances,
        "holdout_class_counts": n_class,
        "per_class_f1": per_class_f1_numbers(s, runs),
        "runs": {
            "promote": s.promote.info.run_id,
            "teacher": s.teacher.info.run_id,
            "trial": s.trial.info.run_id,
            "no_kd_cv": s.no_kd.info.run_id,
            "search": s.search.info.run_id,
        },
    }
    return blocks, numbers


def per_class_table(labels: np.ndarray, probs: np.ndarray, class_names: list[str]):
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, probs.argmax(axis=1), labels=np.arange(len(class_names)), zero_division=0
    )
    rows = [[name, num(precision[i]), num(recall[i]), num(f1[i]), str(int(support[i]))] for i, name in enumerate(class_names)]
    return table("per-class", "Per-class hold-out metrics of the KD student.", ["class", "precision", "recall", "F1", "images"], rows)


def per_class_f1_rows(s: Sources) -> list[tuple[str, str]]:
    """(row label, metric key) of the per-class F1 figures: each class, then macro-F1 (keys never collide)."""
    from pipelines.evaluate import class_keys

    return [*((name, f"f1_{key}") for name, key in zip(s.class_names, class_keys(s.class_names))), ("macro", "f1_macro")]


def per_class_f1_numbers(s: Sources, runs: dict[str, Run]) -> dict[str, dict[str, dict[str, float]]]:
    """Per-class and macro F1 of each model as logged, by metric key: k-fold means (its cross-validation run)
    and hold-out (the promote run); NaN where a run predates these metrics."""
    return {
        who: {
            "kfold_mean": {key: runs[who].data.metrics.get(f"{key}_mean", math.nan) for _, key in per_class_f1_rows(s)},
            "holdout": {key: s.promote.data.metrics.get(f"holdout_{who}_{key}", math.nan) for _, key in per_class_f1_rows(s)},
        }
        for who in MODELS
    }


def per_class_f1_table(s: Sources, runs: dict[str, Run]):
    numbers = per_class_f1_numbers(s, runs)
    rows = [
        [label] + [f"{num(numbers[who]['kfold_mean'][key])} / {num(numbers[who]['holdout'][key])}" for who in MODELS]
        for label, key in per_class_f1_rows(s)
    ]
    return table(
        "per-class-f1",
        "F1 per class and macro-F1 (unweighted mean over the classes): k-fold mean / hold-out, as logged by the runs.",
        ["class"] + list(MODELS.values()),
        rows,
    )


# ---------------------------------------------------------------- the step


@dataclass(frozen=True)
class ReportPaths:
    folder: Path
    methodology_md: Path
    results_md: Path
    methodology_tex: Path
    results_tex: Path
    latex: Path  # standalone report.tex
    numbers: Path  # report.json


def write_report(
    model_name: str,
    stage: str | None = None,
    alias: str | None = None,
    out_dir: Path | str | None = None,
    storage: str = "",
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> ReportPaths:
    """Write the methodology and results (Markdown and LaTeX) of a registered version and log them to its run.

    ``out_dir`` defaults to ``reports/<model>-v<version>``; ``storage`` overrides the Optuna storage recorded by the search.
    """
    if stage is None and alias is None:
        stage = "Production"
    s = gather(model_name, stage, alias, storage)
    folder = Path(out_dir) if out_dir else PROJECT_ROOT / "reports" / f"{model_name}-v{s.version.version}"
    folder.mkdir(parents=True, exist_ok=True)
    method_blocks = methodology(s, resamples)
    result_blocks, numbers = results(s, folder, resamples)
    first_table = 1 + sum(1 for block in method_blocks if type(block).__name__ == "Table")
    paths = ReportPaths(
        folder,
        folder / "methodology.md",
        folder / "results.md",
        folder / "methodology.tex",
        folder / "results.tex",
        folder / "report.tex",
        folder / "report.json",
    )
    paths.methodology_md.write_text(to_markdown(method_blocks))
    paths.results_md.write_text(to_markdown(result_blocks, first_table=first_table))
    paths.methodology_tex.write_text(to_latex(method_blocks))
    paths.results_tex.write_text(to_latex(result_blocks))
    paths.latex.write_text(latex_document(f"{model_name} v{s.version.version}: methods and results", ["methodology", "results"]))
    paths.numbers.write_text(json.dumps(numbers, indent=2, default=float))
    MlflowClient().log_artifacts(s.version.run_id, str(folder), "report")
    if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run . -e report`: say what this run produced
        # Nested under the version's promote run (shown so in the UI when both are in one experiment, as the README's commands keep them).
        for key, value in {
            "kd.step": "report",
            "kd.report_of": f"{model_name} v{s.version.version}",
            "kd.report_run_id": s.version.run_id,
            "mlflow.parentRunId": s.version.run_id,
        }.items():
            MlflowClient().set_tag(os.environ["MLFLOW_RUN_ID"], key, value)
    print(f"report: {model_name} v{s.version.version} -> {folder} (also logged to run {s.version.run_id} under report/)")
    return paths
