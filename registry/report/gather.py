"""Everything a report is written from, read once from the store: the registered version, its promote run, the
teacher run, the best trial's run, the no-KD cross-validation run, the search run, their artifacts, the models,
the Optuna study and the KD comparison on the same data, if one was run. Read only: nothing here trains or writes."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from pipelines.config import STORAGE_URL_ENV, Config, PipelineError, build_parser, config_from_args
from pipelines.names import RunTag, VersionTag
from registry.calibrate import MODELS  # the three models compared, by the key of their hold-out probabilities and metrics
from registry.evidence import ENVIRONMENT_ARTIFACT, PREDICTIONS_ARTIFACT
from search.comparison_tables import ComparisonResults, comparison_results, find_comparison


@dataclass
class Sources:
    """Everything the report is written from, fetched once."""

    model_name: str
    version: object  # ModelVersion
    promote: Run
    teacher: Run  # the teacher run, or an ensemble's first member (data, splits and training parameters are every member's)
    teacher_members: list[Run]  # every member of an ensemble teacher; the teacher run alone otherwise
    teacher_cv: dict[str, float]  # the teacher's cross-validation metrics: its run's, or an ensemble's mean logits' on the folds
    trial: Run
    no_kd: Run
    search: Run
    splits: pd.DataFrame  # the teacher run's data/splits.csv
    predictions: pd.DataFrame  # the promote run's hold-out probabilities
    environment: dict
    data_cfg: Config  # the teacher run's data and training parameters
    student_cfg: Config  # the no-KD CV run's parameters: the trial's student configuration
    study: object | None  # optuna.Study, None when it cannot be read
    study_note: str  # why the study could not be read
    models: object  # registry.explain.RegisteredModels
    selector: str = ""  # how the version was chosen, as `mlflow run -e report` parameters (-P stage=... or -P alias=...)
    comparison: ComparisonResults | None = None  # the KD comparison on the version's data (or the one asked for), if any

    @property
    def class_names(self) -> list[str]:
        return self.teacher.data.params["classes"].split(",")

    @property
    def binary(self) -> bool:
        return len(self.class_names) == 2

    @property
    def ensemble(self) -> bool:
        return len(self.teacher_members) > 1

    @property
    def cv_metrics(self) -> dict[str, dict[str, float]]:
        """Each model's cross-validation metrics, keyed as :data:`MODELS`: the teacher's (:attr:`teacher_cv`), the best
        trial's run and the no-KD run's."""
        return {"teacher": self.teacher_cv, "student": self.trial.data.metrics, "no_kd": self.no_kd.data.metrics}


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


def search_study(search: Run, storage: str) -> tuple[object | None, str]:
    """The study the trial came from, or None with the reason (the report then says what it could not read)."""
    from search.tune import open_study

    cfg = run_config(search)
    from_environment = os.environ.get(STORAGE_URL_ENV, "")
    url = storage or from_environment or search.data.tags.get("optuna.storage", "")
    if not url or "***" in url:
        return None, f"the study's storage URL is not recorded in full (tag optuna.storage = {url!r}); pass storage=..."
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None, f"the study's storage {url} does not exist here; pass storage=..."
    cfg = cfg.replace(storage="" if url == from_environment else url)  # the environment's URL may carry a password: never a parameter
    try:
        study, _ = open_study(cfg)
    except PipelineError as error:  # no such study, or its database cannot be reached
        return None, str(error)
    return study, ""


def ensemble_cv(run_ids: str, splits: pd.DataFrame, classes: list[str], cfg: Config) -> dict[str, float]:
    """An ensemble teacher's cross-validation metrics, from its members' cached logits on the logged fold entries
    (``splits.csv``: fold entry k of repeat r = k // folds in column ``split``, or ``split_repeat_<r>`` for r > 0)."""
    from pipelines.steps.teacher import teacher_cv_summary

    labels = splits["label"].map({name: i for i, name in enumerate(classes)}).to_numpy()
    columns = [("split" if k < cfg.folds else f"split_repeat_{k // cfg.folds}") for k in range(cfg.fold_count)]
    folds = [np.flatnonzero(splits[column].to_numpy() == f"fold_{k}") for k, column in enumerate(columns)]
    return teacher_cv_summary(run_ids, splits["sha256"].to_numpy(), labels, folds, classes)


def gather(model_name: str, stage: str | None, alias: str | None, storage: str = "", comparison: str = "") -> Sources:
    """Fetch the version, its runs, artifacts, models and study, and the comparison named by ``comparison`` (run id or
    name), else the newest finished one on the version's data (same data digest), if any."""
    from registry.explain import load_models
    from registry.fetch import resolve_version

    client = MlflowClient()
    version = resolve_version(model_name, stage, alias)
    promote = client.get_run(version.run_id)
    missing = [tag for tag in (RunTag.NO_KD_CV_RUN_ID, RunTag.TRIAL_RUN_ID) if not promote.data.tags.get(tag)]
    if missing or not version.tags.get(VersionTag.TEACHER_RUN_ID):
        raise PipelineError(
            f"{model_name} v{version.version} was promoted before reports existed "
            f"(its run lacks {missing or ['teacher_run_id']}); promote it again"
        )
    teacher_run_ids = version.tags[VersionTag.TEACHER_RUN_ID]
    members = [client.get_run(run_id) for run_id in teacher_run_ids.split(",")]
    teacher = members[0]
    trial = client.get_run(promote.data.tags[RunTag.TRIAL_RUN_ID])
    no_kd = client.get_run(promote.data.tags[RunTag.NO_KD_CV_RUN_ID])
    search = client.get_run(trial.data.tags["mlflow.parentRunId"])
    with tempfile.TemporaryDirectory() as tmp:
        # Labels and groups stay text: class names such as "0" and "1" must not become numbers.
        text = {"path": str, "label": str, "group": str, "sha256": str, "split": str}
        splits = pd.read_csv(_artifact(teacher.info.run_id, "data/splits.csv", tmp), dtype=text, keep_default_na=False)
        predictions = pd.read_csv(_artifact(promote.info.run_id, PREDICTIONS_ARTIFACT, tmp), dtype=text, keep_default_na=False)
        env = json.loads(_artifact(promote.info.run_id, ENVIRONMENT_ARTIFACT, tmp).read_text())
    classes = teacher.data.params["classes"].split(",")
    teacher_cv = teacher.data.metrics if len(members) == 1 else ensemble_cv(teacher_run_ids, splits, classes, run_config(teacher))
    study, note = search_study(search, storage)
    selector = f"-P alias={alias}" if alias else f"-P stage={stage}"
    compared = find_comparison(comparison, version.tags.get(VersionTag.DATA_DIGEST, ""))
    return Sources(
        model_name,
        version,
        promote,
        teacher,
        members,
        teacher_cv,
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
        comparison_results(compared.info.run_id) if compared else None,
    )


def holdout_arrays(s: Sources) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Hold-out labels (class indices) and each model's class probabilities, from the logged table."""
    frame, class_names = s.predictions, s.class_names
    labels = frame["label"].map({name: i for i, name in enumerate(class_names)}).to_numpy(np.int64)
    probs = {who: frame[[f"{who}_prob_{name}" for name in class_names]].to_numpy(np.float64) for who in MODELS}
    return labels, probs
