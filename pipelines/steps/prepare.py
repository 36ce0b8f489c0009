"""Step ``prepare``: ingest the data, decode it once, split it, and record all of it in MLflow."""

from __future__ import annotations

import numpy as np

from pipelines.config import DATA_INPUTS, DATA_PARAMS, Config, PipelineError
from pipelines.data.images import load_images
from pipelines.data.prepared import Prepared
from pipelines.data.sources import Dataset, ingest
from pipelines.data.splits import Splits, describe_duplicates, make_splits, perceptual_hashes, subsample_minority
from pipelines.log import logger


def minority_class(dataset: Dataset, splits: Splits, requested: str = "") -> str:
    """``requested`` when it is a class of the data, else (empty) the class with the fewest images in the training part."""
    if requested:
        if requested not in dataset.class_names:
            raise PipelineError(f"minority_class={requested!r}: not a class of the data; the classes are {', '.join(dataset.class_names)}")
        return requested
    counts = np.bincount(dataset.labels[splits.train], minlength=dataset.num_classes)
    return dataset.class_names[int(np.argmin(counts))]


def imbalanced(prepared: Prepared, cfg: Config) -> Prepared:
    """Data prepared as it is (imbalance 0), at ``cfg``'s imbalance ratio: the minority class subsampled in the
    training rows of every fold (:func:`pipelines.data.splits.subsample_minority`), validation folds and hold-out unchanged.
    ``kd compare`` prepares the data once and derives each ratio's from it."""
    dataset = prepared.dataset
    minority = minority_class(dataset, prepared.splits, cfg.minority_class)
    ratio = cfg.imbalance_ratio
    splits = subsample_minority(prepared.splits, dataset.labels, dataset.class_names.index(minority), ratio, cfg.seed)
    if ratio:
        kept = [int(np.sum(dataset.labels[train] == dataset.class_names.index(minority))) for train, _ in splits.folds]
        logger("prepare").info(f"imbalance 1:{cfg.imbalance}: the training folds keep {min(kept)}-{max(kept)} {minority!r} images each")
    return Prepared(dataset, splits, prepared.images, cfg.as_params(DATA_INPUTS), minority)


def prepare_data(cfg: Config, reuse: Prepared | None = None) -> Prepared:
    """Manifest, deterministic splits and preprocessed images (decoded once, then read from the cache).

    Splits keep duplicates together, identical or near-identical by a perceptual hash of the preprocessed images;
    hold-out images of a given split that duplicate training images are handled as ``cfg.dedupe`` says.
    ``reuse``: data a caller already prepared (``main`` for its whole chain), returned as is when it was prepared
    from the same data settings as ``cfg`` (a joined study may bring its own), so the data is ingested only once.
    """
    if reuse is not None and reuse.inputs == cfg.as_params(DATA_INPUTS):
        return reuse
    cfg.imbalance_ratio  # noqa: B018 - a list of ratios is refused before the data is read
    dataset = ingest(cfg)
    images = load_images(dataset, cfg.image_size, cfg.cache_dir)
    splits = make_splits(dataset, cfg.folds, cfg.test_fraction, cfg.seed, perceptual_hashes(images), cfg.dedupe, cfg.repeats)
    if splits.duplicates is not None and len(splits.duplicates):
        found = f"{len(splits.duplicates)} hold-out image(s) duplicate training images ({describe_duplicates(splits.duplicates)})"
        action = (
            f"dropped from the hold-out, {len(splits.test)} left"
            if len(splits.dropped)
            else "kept in the hold-out (dedupe=keep): its figures are inflated"
        )
        logger("prepare").info(f"{found}: {action}; listed in data/holdout_duplicates.csv")
    return imbalanced(Prepared(dataset, splits, images, cfg.as_params(DATA_INPUTS), ""), cfg)


def prepare(cfg: Config, prepared: Prepared | None = None, nested: bool = False, launched_run_id: str | None = None) -> str:
    """Run the step (or reuse a finished one): returns the MLflow run id holding the manifest, splits and digest.

    ``launched_run_id``: the run ``mlflow run`` started for this step, which its run resumes (resolved once, in
    :func:`kd.cli.run_command`).
    """
    from pipelines.tracking.runs import reuse_finished, step_run

    prepared = prepared or prepare_data(cfg)
    dataset = prepared.dataset
    counts = dataset.manifest["label"].value_counts().to_dict()
    logger("prepare").info(f"{len(dataset.manifest)} images {counts} from {dataset.source} {dataset.root}, digest {dataset.digest[:12]}")
    previous = reuse_finished("prepare", cfg, DATA_PARAMS, dataset.digest, nested, launched_run_id)
    if previous:
        return previous
    with step_run("prepare", cfg, DATA_PARAMS, dataset, prepared.splits, nested, launched_run_id) as run:
        return run.info.run_id
