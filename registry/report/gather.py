"""Everything a report is written from, read once from the store: the registered version, its promote run, the
teacher run, the best trial's run, the no-KD cross-validation run, the search run, their artifacts, the models,
the Optuna study and the KD comparison on the same data, if one was run. Read only: nothing here trains or writes."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from pipelines.config import STORAGE_URL_ENV, Config, PipelineError, build_parser, config_from_args
from pipelines.evaluation.statistics import kfold_test_train_ratio
from pipelines.names import Metric, RunTag, VersionTag
from registry.calibrate import MODELS  # the three models compared, by the key of their hold-out probabilities and metrics
from registry.evidence import ENVIRONMENT_ARTIFACT, PREDICTIONS_ARTIFACT
from search.compare import COMPARE_STEP, Cell


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
    student_cfg: Config  # the no-KD CV run's parameters: the trial's student and training (not T and alpha, which it leaves out)
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
    from search.study import open_study

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


# ---------------------------------------------------------------- a comparison and its cells


@dataclass(frozen=True)
class CellRun:
    """The finished run of one comparison cell; ``cell`` is the :class:`search.compare.Cell` its tags name."""

    run: Run

    @property
    def tags(self) -> dict[str, str]:
        return self.run.data.tags

    @property
    def metrics(self) -> dict[str, float]:
        return self.run.data.metrics

    @property
    def cell(self) -> Cell:
        return Cell.from_tags(self.tags)

    @property
    def kd(self) -> bool:
        return self.cell.kd

    @property
    def teacher(self) -> str:
        return self.cell.teacher

    @property
    def student(self) -> str:
        return self.cell.student

    @property
    def ratio(self) -> str:
        return self.cell.ratio

    @property
    def teacher_run_ids(self) -> list[str]:
        """The teacher run (or an ensemble's member runs) a KD cell distilled from; none for a no-KD cell."""
        return [run_id for run_id in self.tags.get(RunTag.TEACHER_RUN_ID, "").split(",") if run_id] if self.kd else []

    def describe(self) -> str:
        kind = f"KD from {self.teacher}" if self.kd else "no-KD"
        return f"cell run {self.run.info.run_id} ({kind}, student {self.student}, ratio {self.ratio})"


@dataclass(frozen=True)
class ComparisonResults:
    """A comparison run with its finished cells and the teacher runs they name."""

    run: Run
    cells: list[CellRun]  # the newest finished run of each cell, in (ratio, KD first, teacher, student parameters) order
    teachers: dict[str, Run]  # teacher run id -> run
    class_names: list[str]

    @property
    def name(self) -> str:
        return self.run.data.tags[RunTag.COMPARISON]

    @property
    def minority_class(self) -> str:
        return self.run.data.tags.get(RunTag.MINORITY_CLASS, self.run.data.params.get("minority_class", ""))

    @property
    def folds(self) -> int:
        return int(self.run.data.params["folds"])

    @property
    def fold_count(self) -> int:
        """Validation fold entries: folds x repeats, numbered k = repeat * folds + fold."""
        return self.folds * int(self.run.data.params.get("repeats", "1"))

    @property
    def test_train_ratio(self) -> float:
        """n_test / n_train of one split for the corrected t-test at imbalance ratio 0. Every training image of a repeat
        is validated in exactly one of its folds and trained on in the others, so over the fold entries mean n_test / mean
        n_train is 1 / (folds - 1) whatever the fold sizes. A subsampled ratio trains on fewer rows: its cells log their
        own (``test_train_ratio``), which :func:`kd_table` prefers."""
        return kfold_test_train_ratio(self.folds)

    @property
    def ratios(self) -> list[str]:
        return sorted({cell.ratio for cell in self.cells}, key=float)


def find_comparison(comparison: str = "", data_digest: str = "") -> Run | None:
    """The comparison run named by ``comparison`` (a run id, or a comparison name: its newest finished run), else the
    newest finished comparison on the data of ``data_digest``; None when neither is given or none matches the digest.
    A ``comparison`` that names nothing is an error: it was asked for."""
    client = MlflowClient()
    if comparison:
        try:
            run = client.get_run(comparison)
        except MlflowException:  # not a run id: a comparison name
            run = None
        if run is not None and run.data.tags.get(RunTag.STEP) == COMPARE_STEP and RunTag.CELL_KD not in run.data.tags:
            return run
        found = _comparison_runs(f"tags.`{RunTag.COMPARISON}` = '{comparison}'")
        if not found:
            raise PipelineError(
                f"comparison={comparison!r}: no finished comparison run has that name or id; run `mlflow run . -e compare` "
                "or give the name (tag kd.comparison) or run id of one"
            )
        return found[0]
    if not data_digest:
        return None
    return next(iter(_comparison_runs(f"tags.`{RunTag.DATA_DIGEST}` = '{data_digest}'")), None)


def _comparison_runs(condition: str) -> list[Run]:
    """Finished comparison runs (not their cells) matching ``condition``, newest first, in every experiment."""
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{RunTag.STEP}` = '{COMPARE_STEP}' and {condition} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return [run for run in runs if RunTag.CELL_KD not in run.data.tags]


def comparison_results(comparison_run_id: str) -> ComparisonResults:
    """Read a comparison run, its finished cell runs (the newest of each cell, should one have been run again) and the
    teacher runs its KD cells name."""
    client = MlflowClient()
    run = client.get_run(comparison_run_id)
    name = run.data.tags.get(RunTag.COMPARISON)
    if not name or RunTag.CELL_KD in run.data.tags:
        raise PipelineError(f"run {comparison_run_id} is not a comparison run (it has no tag {RunTag.COMPARISON}, or is one of its cells)")
    found = mlflow.search_runs(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{comparison_run_id}' and tags.`{RunTag.COMPARISON}` = '{name}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    newest: dict[tuple[object, ...], CellRun] = {}
    for cell in (CellRun(found_run) for found_run in found if found_run.data.tags.get(RunTag.CELL_KD) in ("true", "false")):
        newest.setdefault((cell.kd, cell.teacher, cell.student, cell.ratio), cell)
    cells = list(newest.values())
    if not cells:
        raise PipelineError(f"comparison {name!r} (run {comparison_run_id}) has no finished cell runs yet")
    cells.sort(key=lambda c: (float(c.ratio), not c.kd, c.teacher, c.metrics.get(Metric.STUDENT_PARAMS, math.inf), c.student))
    teachers = {run_id: client.get_run(run_id) for cell in cells for run_id in cell.teacher_run_ids}
    # The class names as the data's runs logged them (pipelines.tracking.runs.log_data): a teacher's, else a cell's source run.
    source = next(iter(teachers.values()), None) or client.get_run(cells[0].tags[RunTag.CELL_SOURCE_RUN_ID])
    return ComparisonResults(run, cells, teachers, source.data.params["classes"].split(","))
