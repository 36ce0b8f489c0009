"""``kd evaluate``: external validation of a registered version on a labelled data set from elsewhere.

The data is read like ``prepare`` reads it (folder, split folder, CSV, ``.h5``, NIfTI), its classes matched to the
model's by name (``class_map`` renames), every image checked against the version's own data set by sha256 and by the
perceptual hash ``prepare`` groups duplicates with (overlapping images dropped, kept or refused: ``dedupe``), and the
rest sent as files through the served model, in the format the version serves, in batches. The run (named
``evaluate``) logs the metrics with 95 % bootstrap intervals, ``ece`` and ``brier``, the confusion matrix, ROC and PR
curves, the reliability diagram, the predictions and the overlap list; the version lists it in its ``kd.evaluations``
tag and its audit trail (``kd history``), and ``kd fetch`` prints it.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from pipelines.batches import in_batches
from pipelines.config import BRATS_MODALITIES, Config, PipelineError
from pipelines.data.images import load_images
from pipelines.data.sources import Dataset, ingest
from pipelines.data.splits import HASH_FREQUENCIES, describe_duplicates, hash_bits, perceptual_hashes
from pipelines.evaluation.calibration import reliability_figure
from pipelines.evaluation.external import BOOTSTRAP_RESAMPLES, match_classes, metrics_with_intervals, training_overlap
from pipelines.evaluation.metrics import write_evaluation_artifacts
from pipelines.log import logger
from pipelines.names import Metric, RunTag, VersionTag
from pipelines.tracking.runs import close_stale_runs, local_source, tracked_run
from registry.evidence import TRAINING_HASHES_ARTIFACT
from registry.fetch import resolve_version
from registry.model import MAX_BATCH, encode_file
from registry.roles import record, registry_lock

# Images per request to the served model: well under its MAX_BATCH, so the progress bar moves on small sets too.
EVALUATE_BATCH = min(64, MAX_BATCH)


def ingest_for_model(cfg: Config, model_classes: list[str], positive: str | None) -> Dataset:
    """The data as ``prepare`` reads it. A two-class set is ordered by the model's positive class (renamed back through
    ``class_map``) rather than guessed from folder names; a set without that class gets the class-mismatch line."""
    candidates = [data for data, model in _class_map(cfg).items() if model == positive] or [positive]
    if positive is None or len(candidates) != 1:
        return ingest(cfg.replace(positive_class=""))
    try:
        return ingest(cfg.replace(positive_class=candidates[0]))
    except PipelineError as error:
        if "only applies to two classes" in str(error):  # more than two data classes: no positive class to order by
            return ingest(cfg.replace(positive_class=""))
        if str(error).startswith("positive_class="):  # two classes, neither the model's positive one
            raise PipelineError(
                f"the data's classes do not match the model's {model_classes}: {str(error).removeprefix('positive_class=')}; "
                "rename with class_map=data_class:model_class,..."
            ) from None
        raise


def _class_map(cfg: Config) -> dict[str, str]:
    from pipelines.config import parse_class_map

    return parse_class_map(cfg.class_map)


def training_manifest(version: ModelVersion, modality: int | None, image_size: int, cache_dir: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The version's data set (path, sha256, split) and each image's perceptual hash, as its promote run logged them.

    Versions promoted before that was logged: the manifest of its teacher run (``data/splits.csv``), hashed from the
    files where they can still be read (the decoded-image cache of that data set is reused); else sha256 only, said so.
    """
    try:
        frame = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{version.run_id}/{TRAINING_HASHES_ARTIFACT}")))
        return frame, hash_bits(frame["phash"].fillna(""))
    except Exception:  # MLflow raises several types for a missing artifact
        pass
    teacher_run_id = version.tags.get(VersionTag.TEACHER_RUN_ID, "").split(",")[0]
    try:
        frame = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{teacher_run_id}/data/splits.csv")))
    except Exception:
        raise PipelineError(
            f"{version.name} v{version.version}: neither {TRAINING_HASHES_ARTIFACT} on its run nor its teacher run's data/splits.csv "
            "can be read, so overlap with training cannot be checked; promote it again"
        ) from None
    digest = version.tags.get(VersionTag.DATA_DIGEST, "unknown")
    dataset = Dataset(frame, sorted(frame["label"].unique()), None, "manifest", Path("."), modality, digest)
    try:
        return frame, perceptual_hashes(load_images(dataset, image_size, cache_dir))
    except PipelineError as error:
        logger("evaluate").info(f"the version's training images cannot be read here ({error}); overlap is checked by sha256 only")
        return frame, np.zeros((len(frame), HASH_FREQUENCIES**2 - 1), bool)  # all-False: no hash known


def served_probabilities(model: mlflow.pyfunc.PyFuncModel, paths: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Class probabilities of the served model for image files, sent as a clinic sends them (base64 files, at most
    ``EVALUATE_BATCH`` a request), with a progress bar."""
    from tqdm.auto import tqdm

    with tqdm(total=len(paths), desc="evaluate", unit="img", mininterval=1.0) as bar:

        def predict(chunk: np.ndarray) -> pd.DataFrame:
            output = model.predict(pd.DataFrame({"image": [encode_file(path) for path in chunk]}))
            bar.update(len(chunk))
            return output

        output = in_batches(predict, paths, EVALUATE_BATCH)
    return output[[f"prob_{name}" for name in class_names]].to_numpy(np.float64)


def evaluate_version(
    cfg: Config,
    stage: str | None = None,
    alias: str | None = None,
    version: str | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    launched_run_id: str | None = None,
) -> str:
    """Evaluate the registered version on ``cfg.data_dir``; returns the ``evaluate`` run's id (see the module docstring):
    ``launched_run_id``, the run ``mlflow run`` started for this step, resumed, or a new one."""
    if not cfg.data_dir:
        raise PipelineError("evaluate needs data_dir: a labelled folder, split folder, CSV manifest, .h5 or NIfTI folder from elsewhere")
    if resamples < 100:
        raise PipelineError(f"resamples={resamples}: a 95% bootstrap interval needs at least 100 resamples (default {BOOTSTRAP_RESAMPLES})")
    name = cfg.model_name
    found = resolve_version(name, stage, alias, version)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{found.version}")
    served = model.unwrap_python_model()
    class_names, image_size = list(served.class_names), int(served.image_size)
    modality = BRATS_MODALITIES[served.modality] if served.modality is not None else cfg.modality
    data_cfg = cfg.replace(image_size=image_size, modality=modality)
    positive = class_names[1] if len(class_names) == 2 else None
    dataset = ingest_for_model(data_cfg, class_names, positive)
    to_model = match_classes(dataset.class_names, class_names, cfg.class_map)
    labels = to_model[dataset.labels]
    logger("evaluate").info(
        f"{name} v{found.version} ({served.serving_format}) on {len(labels)} images of {dataset.root} ({dataset.source})"
    )

    training, training_hashes = training_manifest(found, served.modality, image_size, cfg.cache_dir)
    overlap = training_overlap(
        dataset.manifest, perceptual_hashes(load_images(dataset, image_size, cfg.cache_dir)), training, training_hashes
    )
    if len(overlap):
        found_text = f"{len(overlap)} image(s) the version already saw ({describe_duplicates(overlap)})"
        if cfg.dedupe == "error":
            raise PipelineError(
                f"{found_text}, e.g. {overlap['path'].iloc[0]} = {overlap['training_path'].iloc[0]}; remove them, or pass dedupe=drop "
                "(leave them out) or dedupe=keep"
            )
        logger("evaluate").info(f"{found_text}: " + ("dropped" if cfg.dedupe == "drop" else "kept (dedupe=keep): the figures are inflated"))
    keep = np.arange(len(labels)) if cfg.dedupe == "keep" else np.setdiff1d(np.arange(len(labels)), overlap.index.to_numpy())
    absent = [class_names[i] for i in range(len(class_names)) if not np.any(labels[keep] == i)]
    if absent:
        raise PipelineError(
            f"after dropping the {len(overlap)} image(s) the version already saw, the data has no {absent} left; add unseen images of "
            "those classes"
        )

    probs = served_probabilities(model, dataset.manifest["path"].to_numpy()[keep], class_names)
    metrics = metrics_with_intervals(labels[keep], probs, class_names, resamples, cfg.seed)
    metrics.update({Metric.OVERLAP_WITH_TRAINING: len(overlap), "n_images": len(keep), "n_read": len(labels)})
    if mlflow.active_run() is None and not launched_run_id:  # a launched run is in the experiment `mlflow run` chose
        mlflow.set_experiment(cfg.experiment_name)
    close_stale_runs()
    with tracked_run(cfg, run_name="evaluate", run_id=launched_run_id) as run:
        run_id = run.info.run_id
        tags = {
            RunTag.STEP: "evaluate",
            RunTag.MODEL_NAME: name,
            RunTag.MODEL_VERSION: str(found.version),
            RunTag.DATA_DIGEST: dataset.digest,
        }
        mlflow.set_tags(tags)
        already = mlflow.get_run(run_id).data.params  # `mlflow run` logged the MLproject parameters
        params = {
            "model_name": name,
            "model_version": found.version,
            "serving_format": served.serving_format,
            "data_dir": cfg.data_dir,
            "data_source": dataset.source,
            "classes": ",".join(dataset.class_names),
            "class_map": cfg.class_map,
            "dedupe": cfg.dedupe,
            "resamples": resamples,
            "seed": cfg.seed,
        }
        mlflow.log_params({key: value for key, value in params.items() if key not in already})
        source = mlflow.data.from_pandas(
            dataset.manifest[["path", "label", "sha256"]],
            source=local_source(dataset.root),
            targets="label",
            name=f"{dataset.source}:{dataset.root.name}",
            digest=dataset.digest[:32],
        )
        mlflow.log_input(source, context="evaluation")
        # Attached to the version's logged model too (MLflow 3's model_id), so its page shows how it did on this data.
        mlflow.log_metrics(metrics, model_id=found.model_id, dataset=source)
        _log_artifacts(dataset, keep, labels, probs, class_names, overlap, f"{name} v{found.version} on {dataset.root.name}")
        summary = (
            f"{dataset.root.name} ({len(keep)} images, {len(overlap)} overlapping training {cfg.dedupe}): "
            f"macro-F1 {metrics['f1_macro']:.4f} [{metrics['f1_macro_ci_low']:.4f}, {metrics['f1_macro_ci_high']:.4f}]; run {run_id}"
        )
        link_evaluation(name, found.version, run_id, summary, cfg.storage_url)
    logger("evaluate").info(f"{name} v{found.version} on {summary}")
    for key in ("f1_macro", "accuracy", "auc_macro", "ece", "brier"):
        interval = f" [{metrics[f'{key}_ci_low']:.4f}, {metrics[f'{key}_ci_high']:.4f}]" if f"{key}_ci_low" in metrics else ""
        print(f"  {key:<10} {metrics[key]:.4f}{interval}")
    return run_id


def _log_artifacts(
    dataset: Dataset,
    keep: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    overlap: pd.DataFrame,
    title: str,
) -> None:
    """Confusion matrix, ROC/PR curves, classification report, reliability diagram, the predictions and the overlap list."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "evaluation"
        write_evaluation_artifacts(labels[keep], probs, class_names, out, title)
        reliability_figure({title: (probs, labels[keep])}, out / "reliability.png")
        predictions = dataset.manifest.iloc[keep][["path", "sha256", "label"]].reset_index(drop=True)
        predictions["model_label"] = np.asarray(class_names)[labels[keep]]
        for index, class_name in enumerate(class_names):
            predictions[f"prob_{class_name}"] = probs[:, index]
        predictions.to_csv(out / "predictions.csv", index=False)
        overlap.to_csv(out / "overlap_with_training.csv")
        mlflow.log_artifacts(str(out), "evaluation")


def link_evaluation(name: str, version: str, run_id: str, summary: str, storage_url: str) -> None:
    """Append the run to the version's ``kd.evaluations`` tag (under the registry lock: two evaluations at once both
    stay) and to the model's audit trail, which ``kd history`` prints."""
    client = MlflowClient()
    with registry_lock(name, storage_url):
        current = client.get_model_version(name, version).tags.get(VersionTag.EVALUATIONS, "")
        client.set_model_version_tag(name, version, VersionTag.EVALUATIONS, ",".join([*filter(None, current.split(",")), run_id]))
        record(client, name, "evaluate", version, None, summary)
