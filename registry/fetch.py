"""Fetch a registered model by stage or alias: the loaded model, and what it is (version, metrics, lineage)."""

from __future__ import annotations

import functools

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipelines.config import PipelineError
from pipelines.evaluation.metrics import CONFUSION_ARTIFACT
from pipelines.names import VersionTag

STAGES = ("Production", "Staging", "Archived", "None")


def resolve_version(name: str, stage: str | None = None, alias: str | None = None, version: str | None = None) -> ModelVersion:
    """The version a stage or alias points at (or the numbered ``version``), with a clear error for unknown names, stages,
    aliases and versions."""
    if sum(given is not None for given in (stage, alias, version)) != 1:
        raise PipelineError("give exactly one of stage, alias or version")
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise PipelineError(f"no registered model {name!r}; promote one first (mlflow run . -e promote)") from None
    if version is not None:
        try:
            return client.get_model_version(name, str(version))
        except MlflowException:
            raise PipelineError(f"{name} has no version {version!r}") from None
    if alias is not None:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException:
            raise PipelineError(f"{name} has no version with alias {alias!r}") from None
    if stage not in STAGES:
        raise PipelineError(f"stage={stage!r}: use one of {', '.join(STAGES)}")
    versions = client.get_latest_versions(name, stages=[stage])
    if not versions:
        raise PipelineError(f"{name} has no version in stage {stage!r}")
    return versions[0]


def fetch_model(name: str, stage: str | None = None, alias: str | None = None) -> mlflow.pyfunc.PyFuncModel:
    """The model that predicts on images (DataFrame column ``image`` of base64 files, or an array batch)."""
    version = resolve_version(name, stage, alias)
    return mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")


def describe(version: ModelVersion) -> str:
    """Version, stage, aliases, metrics and lineage as printable lines."""
    lines = [
        f"model      : {version.name} v{version.version} ({version.current_stage}; aliases {', '.join(version.aliases) or 'none'})",
        f"uri        : models:/{version.name}/{version.version}",
        f"run        : {version.run_id}",
        f"trained on : {version.tags.get(VersionTag.TRAINED_ON, 'not recorded (promoted before this was tagged)')}, data digest "
        f"{version.tags.get(VersionTag.DATA_DIGEST, 'not recorded')}",
        f"description: {version.description}",
    ]
    lines += [f"  {key:<22} {value}" for key, value in sorted(version.tags.items())]
    return "\n".join(lines + per_class_lines(version.run_id) + evaluation_lines(version))


def evaluation_lines(version: ModelVersion) -> list[str]:
    """One line per external validation of the version (``kd evaluate``: its ``kd.evaluations`` tag), oldest first."""
    run_ids = [run_id for run_id in version.tags.get(VersionTag.EVALUATIONS, "").split(",") if run_id]
    if not run_ids:
        return ["external validation: none (kd evaluate --model_name ... --data_dir ...)"]
    lines = ["external validation (kd evaluate; 95% bootstrap intervals):"]
    for run_id in run_ids:
        try:
            run = MlflowClient().get_run(run_id)
        except MlflowException:
            lines.append(f"  run {run_id}: deleted")
            continue
        m, p = run.data.metrics, run.data.params
        figure = functools.partial(_with_interval, m)
        lines.append(
            f"  run {run_id} ({run.info.status}): {p.get('data_dir', '?')} digest {run.data.tags.get('kd.data_digest', '?')[:12]}, "
            f"{m.get('n_images', float('nan')):.0f} images, overlap with training {m.get('overlap_with_training', float('nan')):.0f} "
            f"({p.get('dedupe', '?')}): macro-F1 {figure('f1_macro')}, accuracy {figure('accuracy')}, ECE {m.get('ece', float('nan')):.4f}"
        )
    return lines


def _with_interval(metrics: dict[str, float], key: str) -> str:
    """``0.8123 [0.7456, 0.8790]``: a metric and its logged 95 % interval, or n/a."""
    if key not in metrics:
        return "n/a"
    return f"{metrics[key]:.4f} [{metrics.get(f'{key}_ci_low', float('nan')):.4f}, {metrics.get(f'{key}_ci_high', float('nan')):.4f}]"


def per_class_lines(run_id: str) -> list[str]:
    """The KD student's hold-out F1 per class, macro-F1 and confusion matrix, from its promote run
    (none for versions promoted before they were logged)."""
    try:
        record = mlflow.artifacts.load_dict(f"runs:/{run_id}/{CONFUSION_ARTIFACT}")
    except Exception:  # MLflow raises several types for a missing artifact
        return []
    metrics = MlflowClient().get_run(run_id).data.metrics
    names, matrix = record["class_names"], record["matrices"]["holdout_student"]
    corner = "true / predicted"
    width = max(len(name) for name in [*names, corner])

    def score(key: str) -> str:
        value = metrics.get(f"holdout_student_{key}")
        return "n/a" if value is None else f"{value:.4f}"

    lines = ["hold-out F1 per class (KD student):"]
    lines += [f"  {name:<{width}} {score(key)}" for name, key in zip(names, record["metric_keys"])]
    lines += [f"  {'macro':<{width}} {score('f1_macro')}", "hold-out confusion matrix (KD student; rows true, columns predicted):"]
    columns = [max(len(name), 4) for name in names]
    lines.append(f"  {corner:<{width}} " + " ".join(f"{name:>{w}}" for name, w in zip(names, columns)))
    lines += [f"  {name:<{width}} " + " ".join(f"{count:>{w}}" for count, w in zip(row, columns)) for name, row in zip(names, matrix)]
    return lines


def _with_interval(metrics: dict[str, float], key: str) -> str:
    """``0.8123 [0.7456, 0.8790]``: a metric and its logged 95 % interval, or n/a."""
    if key not in metrics:
        return "n/a"
    return f"{metrics[key]:.4f} [{metrics.get(f'{key}_ci_low', float('nan')):.4f}, {metrics.get(f'{key}_ci_high', float('nan')):.4f}]"
