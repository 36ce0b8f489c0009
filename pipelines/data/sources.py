"""Data sources: from a folder of scans (or a CSV manifest) to one manifest and the digest that identifies the data.

``ingest`` turns any supported source into one manifest (path, label, group, sha256, given split) and a digest.
Sources: a folder per class (flat, or ``Training/`` + ``Testing/``), BraTS2020 ``.h5`` slices, BraTS NIfTI cases
(``<case>/<case>_flair.nii.gz`` ... ``<case>_seg.nii.gz``, read as axial slices), a CSV manifest, and (``data_dir``
empty) the embedded synthetic set, which is read back through the folder loader.

A manifest row is a file, except for NIfTI, where it is one axial slice of a volume: ``<volume>#z=<index>``.
Every file is checked before its data is read: its name, its links, and the array types and sizes its header
declares (``MAX_PIXELS``). The readers of BraTS slices and NIfTI volumes are in :mod:`pipelines.data.volumes` (ingest
needs them: masks label slices, volumes are sliced); decoding (:mod:`pipelines.data.images`) builds on them.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import Config, PipelineError, modality_index
from pipelines.data.files import check_data_file, sha256_file
from pipelines.data.volumes import BRATS_PATTERN, NIFTI_PATTERN, brats_rows, nifti_rows

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_DIR_NAMES = {"training": "train", "train": "train", "testing": "test", "test": "test"}
POSITIVE_NAMES = {"yes", "tumor", "tumour", "tumors", "tumours", "positive", "pos", "abnormal", "malignant", "lesion", "1", "true"}
NEGATIVE_NAMES = {"no", "normal", "healthy", "negative", "neg", "no_tumor", "no_tumour", "notumor", "notumour", "no-tumor", "0", "false"}


@dataclass(frozen=True)
class Dataset:
    """A manifest and what identifies it. Rows are sorted by path so order never depends on the file system."""

    manifest: pd.DataFrame  # columns: path, label, group, sha256, given_split ("train", "test" or "")
    class_names: list[str]  # binary: [negative, positive], so index 1 is the positive class
    positive_class: str | None
    source: str  # folder, folder-split, brats, nifti, csv, synthetic
    root: Path
    modality: int | None  # BraTS channel (.h5) or file (NIfTI) the images come from; None for pictures
    digest: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @property
    def labels(self) -> np.ndarray:
        return self.manifest["label"].map({name: i for i, name in enumerate(self.class_names)}).to_numpy(np.int64)


def _image_files(folder: Path, data_root: Path) -> list[Path]:
    """Image files by extension, any case; hidden files and folders (.DS_Store, ._foo.jpg, .ipynb_checkpoints/) are skipped.

    Every candidate is checked (:func:`pipelines.data.files.check_data_file`), so a broken link is an error, not a silently missing image;
    so is a link to a folder, which rglob does not follow.
    """
    files = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_symlink() and path.is_dir():
            raise PipelineError(
                f"{path}: a link to a folder ({path.resolve()}), which is not followed; move or copy the images into the data folder"
            )
        if path.suffix.lower() in IMAGE_EXTENSIONS and (path.is_file() or path.is_symlink()):
            check_data_file(path, data_root)  # a broken link raises here
            files.append(path)
    return files


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _folder_rows(root: Path, data_root: Path, given_split: str = "") -> list[dict]:
    rows = []
    class_dirs = _class_dirs(root)
    if not class_dirs:
        raise PipelineError(f"{root}: no class folders found; expected one sub-folder per class (e.g. yes/ and no/)")
    for class_dir in class_dirs:
        files = _image_files(class_dir, data_root)
        if not files:
            raise PipelineError(
                f"{class_dir}: class folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
            )
        for path in files:
            # No patient ids in these sets: the group is the image's content (see ingest).
            rows.append({"path": str(path), "label": class_dir.name, "group": "", "given_split": given_split})
    return rows


def _split_folder_rows(root: Path, split_dirs: dict[str, Path]) -> list[dict]:
    if set(split_dirs) != {"train", "test"}:
        raise PipelineError(
            f"{root}: found {sorted(p.name for p in split_dirs.values())}; a split layout needs both Training/ and Testing/"
        )
    rows = []
    for split, folder in split_dirs.items():
        rows += _folder_rows(folder, root, given_split=split)
    return rows


def _read_csv(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and ``(line, fields)`` records of a UTF-8 CSV; blank lines are skipped, bad quoting is an error."""
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, strict=True)
            header = next(reader, None)
            records = [(reader.line_num, fields) for fields in reader if any(field.strip() for field in fields)]
    except UnicodeDecodeError as error:
        raise PipelineError(f"{csv_path}: not UTF-8 text ({error}); save the manifest as UTF-8 CSV") from None
    except csv.Error as error:
        raise PipelineError(f"{csv_path}: not a valid CSV ({error}); quote fields that contain commas, quotes or line breaks") from None
    if header is None:
        raise PipelineError(f"{csv_path}: empty file; a manifest needs a header path,label[,group] and one row per image")
    return [name.strip() for name in header], records


def _csv_rows(csv_path: Path) -> list[dict]:
    header, records = _read_csv(csv_path)
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise PipelineError(f"{csv_path}: column(s) {duplicated} appear more than once; keep one of each")
    missing = {"path", "label"} - set(header)
    if missing:
        raise PipelineError(f"{csv_path}: missing column(s) {sorted(missing)}; a manifest needs path,label[,group]")
    if not records:
        raise PipelineError(f"{csv_path}: no rows after the header; add one row per image")
    root = csv_path.parent.resolve()
    rows, first_line = [], {}
    for line, fields in records:
        if len(fields) != len(header):
            raise PipelineError(
                f"{csv_path}:{line}: {len(fields)} field(s) where the header has {len(header)}; quote paths that contain commas"
            )
        record = dict(zip(header, fields))
        # Surrounding spaces would make "yes " a class of its own beside "yes".
        label, group = record["label"].strip(), record.get("group", "").strip()
        try:
            path = (root / record["path"]).resolve()
            exists = path.is_file()
        except (OSError, ValueError) as error:  # a NUL byte, a name longer than the file system allows
            raise PipelineError(f"{csv_path}:{line}: path {record['path']!r} is not a usable file name ({error})") from None
        if not path.is_relative_to(root):
            raise PipelineError(
                f"{csv_path}:{line}: path {record['path']!r} points outside {root}; keep images under the manifest's folder"
            )
        if not exists:
            raise PipelineError(f"{csv_path}:{line}: {record['path']!r} does not exist")
        if not label:
            raise PipelineError(f"{csv_path}:{line}: empty label")
        if path in first_line:  # with two labels the same scan would be both classes at once
            raise PipelineError(f"{csv_path}:{line}: {record['path']!r} is also on line {first_line[path]}; list each image once")
        first_line[path] = line
        rows.append({"path": str(path), "label": label, "group": group, "given_split": ""})
    return rows


def resolve_data_dir(cfg: Config) -> tuple[Path, str]:
    """The folder or file to read and its source kind; an empty data_dir means the embedded synthetic set."""
    if not cfg.data_dir:
        from pipelines.data.synthetic import ensure_synthetic_dataset

        return ensure_synthetic_dataset(
            Path(cfg.cache_dir), n_images=cfg.synthetic_images, seed=0, classes=cfg.synthetic_classes
        ), "synthetic"
    root = Path(cfg.data_dir).expanduser().resolve()
    if not root.exists():
        raise PipelineError(
            f"data_dir={cfg.data_dir!r} does not exist; give a folder of class folders, a BraTS .h5 or NIfTI folder or a CSV manifest"
        )
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise PipelineError(f"data_dir={cfg.data_dir!r} is a file but not a .csv manifest (path,label[,group])")
        return root, "csv"
    return root, "folder"


def detect_positive_class(class_names: list[str], requested: str = "") -> str:
    """The positive class of a binary problem: the requested one, else the one named like a finding."""
    if requested:
        if requested not in class_names:
            raise PipelineError(f"positive_class={requested!r} is not a class; classes are {class_names}")
        return requested
    positives = [name for name in class_names if name.lower() in POSITIVE_NAMES]
    negatives = [name for name in class_names if name.lower() in NEGATIVE_NAMES]
    if len(positives) == 1 and positives[0] not in negatives:
        return positives[0]
    if len(negatives) == 1:
        return next(name for name in class_names if name != negatives[0])
    raise PipelineError(f"cannot tell which of {class_names} is the positive class; pass positive_class=<one of them>")


def ingest(cfg: Config) -> Dataset:
    """Read the configured source into a :class:`Dataset` (manifest, classes, positive class, digest)."""
    root, source = resolve_data_dir(cfg)
    modality = None
    if source == "csv":
        rows = _csv_rows(root)
    else:
        brats_files = sorted(p for p in root.rglob("*.h5") if BRATS_PATTERN.search(p.name))
        nifti_files = sorted(
            p
            for p in root.rglob("*.nii*")
            if NIFTI_PATTERN.match(p.name) and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )  # hidden: skipped, as for images
        split_dirs = {SPLIT_DIR_NAMES[p.name.lower()]: p for p in _class_dirs(root) if p.name.lower() in SPLIT_DIR_NAMES}
        if brats_files:
            source, modality = "brats", modality_index(cfg.modality)
            rows = brats_rows(root, brats_files)
        elif nifti_files:
            source, modality = "nifti", modality_index(cfg.modality)
            rows = nifti_rows(root, nifti_files, modality)
        elif split_dirs:
            source = "folder-split"
            rows = _split_folder_rows(root, split_dirs)
        else:
            rows = _folder_rows(root, root)
    manifest = pd.DataFrame(rows, columns=["path", "label", "group", "sha256", "given_split"]).sort_values("path", ignore_index=True)
    # Every row is a file, hashed here, but NIfTI slices, hashed by their pixels when read.
    manifest["sha256"] = [
        digest if isinstance(digest, str) else sha256_file(Path(p)) for p, digest in zip(manifest["path"], manifest["sha256"])
    ]
    # Without patient ids each image is its own group, but identical files (the real yes/no set has 22
    # such pairs and triples) are one group: a copy in training and its twin in validation would be a leak.
    ungrouped = manifest["group"] == ""
    manifest.loc[ungrouped, "group"] = "sha256:" + manifest.loc[ungrouped, "sha256"]

    class_names = sorted(manifest["label"].unique())
    if len(class_names) < 2:
        raise PipelineError(f"{root}: only one class ({class_names}); classification needs at least two classes")
    positive = None
    if len(class_names) == 2:
        positive = detect_positive_class(class_names, cfg.positive_class)
        class_names = [name for name in class_names if name != positive] + [positive]
    elif cfg.positive_class:
        raise PipelineError(f"positive_class={cfg.positive_class!r} only applies to two classes; {len(class_names)} classes use macro F1")

    identity = "\n".join(
        f"{sha},{label},{group},{split}"
        for sha, label, group, split in manifest[["sha256", "label", "group", "given_split"]].itertuples(index=False)
    )
    identity += f"\nmodality={modality}\n"
    digest = hashlib.sha256(identity.encode()).hexdigest()
    return Dataset(manifest, class_names, positive, source, root, modality, digest)
