"""The report's methods on the data: what was read, how it was split and augmented."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.config import Config
from pipelines.names import RunTag
from registry.report.document import Block, Code, Heading, data_label, para, table
from registry.report.gather import Sources


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


def image_size_range(paths: list[str]) -> str:
    """Raw image sizes read from the files' headers (a NIfTI slice row's from its volume's header: the slice is its
    first two axes), or why they could not be read: a missing file is named as missing, a file that is no picture as
    unreadable."""
    import nibabel
    from PIL import Image

    from pipelines.data.images import row_file

    sizes = []
    for file in dict.fromkeys(row_file(path) for path in paths):  # a volume's slice rows share its header
        if file.suffix.lower() == ".h5":
            return "stored as HDF5 slices (see the BraTS source)"
        if not file.is_file():
            return f"not available ({file.name} and perhaps others are no longer at their recorded paths)"
        try:
            if file.name.lower().endswith((".nii", ".nii.gz")):
                sizes.append(tuple(int(n) for n in nibabel.load(file).shape[:2]))  # the header only: no voxels read
            else:
                with Image.open(file) as image:
                    sizes.append(image.size)
        except (OSError, nibabel.filebasedimages.ImageFileError) as error:
            return f"not available ({file.name} could not be read as an image: {error})"
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
