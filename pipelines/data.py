"""Ingestion, preprocessing and splits: from a folder of scans to arrays and folds.

``ingest`` turns any supported source into one manifest (path, label, group, sha256, given split) and a
digest that identifies the data; ``load_images`` decodes and preprocesses every image once (cached on
disk); ``make_splits`` gives the hold-out test split and stratified group k-fold on the rest, keeping
duplicates (identical files, and near-identical images by :func:`perceptual_hashes`) on one side of every split.

Sources: a folder per class (flat, or ``Training/`` + ``Testing/``), BraTS2020 ``.h5`` slices, BraTS NIfTI
cases (``<case>/<case>_flair.nii.gz`` ... ``<case>_seg.nii.gz``, read as axial slices), a CSV manifest, and
(``data_dir`` empty) the embedded synthetic set, which is read back through the folder loader.

A manifest row is a file, except for NIfTI, where it is one axial slice of a volume: ``<volume>#z=<index>``
(:func:`decode_image` reads it, :func:`request_bytes` gives what a client sends the served model for it).
Files are decoded by content, never by name: HDF5 (BraTS slices), NIfTI (plain or gzipped) or a picture.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import logging
import math
import os
import re
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from scipy.fft import dctn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from pipelines.config import BRATS_MODALITIES, DEDUPE_MODES, Config, PipelineError, modality_index

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_DIR_NAMES = {"training": "train", "train": "train", "testing": "test", "test": "test"}
BRATS_PATTERN = re.compile(r"volume_(\d+)_slice_(\d+)\.h5$")
# BraTS NIfTI cases: one file per modality and a segmentation, all named after the case.
NIFTI_PATTERN = re.compile(r"^(?P<case>.+)_(?P<kind>flair|t1|t1ce|t2|seg)\.nii(\.gz)?$", re.IGNORECASE)
NIFTI_SLICE = re.compile(r"^(?P<file>.+\.nii(\.gz)?)#z=(?P<z>\d+)$", re.IGNORECASE)
# Slice selection: a slice is kept when its brain covers at least this fraction of the case's largest slice.
NIFTI_MIN_BRAIN_FRACTION = 0.25
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
GZIP_MAGIC = b"\x1f\x8b"
NIFTI2_HEADER_BYTES = 540  # NIfTI-1 headers are 348 bytes, NIfTI-2 headers 540: enough bytes to sniff either
POSITIVE_NAMES = {"yes", "tumor", "tumour", "tumors", "tumours", "positive", "pos", "abnormal", "malignant", "lesion", "1", "true"}
NEGATIVE_NAMES = {"no", "normal", "healthy", "negative", "neg", "no_tumor", "no_tumour", "notumor", "notumour", "no-tumor", "0", "false"}
# Decompression-bomb guard: the largest real scans here are 1920x1080; 50 Mpx leaves room, refuses bombs.
MAX_PIXELS = 50_000_000
# Bumped whenever preprocessing changes, so cached arrays from an older version are never reused.
PREPROCESS_VERSION = 2
# Near-duplicates (see perceptual_hashes): hash of the 12x12 lowest DCT frequencies of the preprocessed image at
# 32x32, and the largest Hamming distance (of its 143 bits) that still counts as the same scan. On the real yes/no
# set at 64 px, re-saved copies of one scan are at most 8 apart and two different scans at least 22, and JPEG
# re-encodes and 0.9x-1.1x rescaled copies fall within 16 (tests/test_data.py measures all three, at 32 px).
HASH_SIDE, HASH_FREQUENCIES, NEAR_DUPLICATE_BITS = 32, 12, 16


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


@dataclass(frozen=True)
class Splits:
    """Row indices into the manifest: a hold-out test set and k (train, validation) folds of the rest."""

    test: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]
    # Rows of a given hold-out split that duplicate training rows and were left out of every part (dedupe=drop).
    dropped: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    # Those duplicates (test_path, train_path, kind, distance), indexed by hold-out row; None: no given split to check.
    duplicates: pd.DataFrame | None = None
    # The group each row was split by (near-duplicates joined, see duplicate_groups); None: the manifest's groups.
    groups: np.ndarray | None = None

    @property
    def train(self) -> np.ndarray:
        """Every non-test row (what the all-data models train on)."""
        return np.sort(np.concatenate([self.folds[0][0], self.folds[0][1]]))

    def table(self, dataset: Dataset) -> pd.DataFrame:
        """One row per image with the group it was split by and its assignment (``test``, ``fold_<k>`` or ``dropped``), for logging."""
        assignment = np.empty(len(dataset.manifest), dtype=object)
        assignment[self.test] = "test"
        assignment[self.dropped] = "dropped"
        for k, (_, val) in enumerate(self.folds):
            assignment[val] = f"fold_{k}"
        frame = dataset.manifest[["path", "label", "group", "sha256"]].copy()
        if self.groups is not None:
            frame["group"] = self.groups
        frame["split"] = assignment
        return frame


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shown(path: Path | str) -> str:
    """A path as messages show it: bytes that are not UTF-8 (possible in Linux file names) as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _check_data_file(path: Path, data_root: Path) -> None:
    """Refuse what would break lineage or logging later: non-UTF-8 names, broken links, links out of the data.

    Only files under ``data_dir`` are covered by its digest and logged as its source, and MLflow writes
    file names as UTF-8; a symbolic link elsewhere would silently train on data the run does not describe.
    """
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise PipelineError(f"{shown(path)}: file name is not valid UTF-8; rename the file (MLflow logs file names as UTF-8)") from None
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symbolic link loop
        raise PipelineError(f"{path}: cannot follow this symbolic link ({error}); remove it") from None
    if not target.exists():
        raise PipelineError(f"{path}: broken symbolic link (target {target} does not exist); remove the link or restore its target")
    if not target.is_relative_to(data_root.resolve()):
        raise PipelineError(
            f"{path}: links to {target}, outside data_dir {data_root}; copy the file into the data folder instead of linking it"
        )


def _image_files(folder: Path, data_root: Path) -> list[Path]:
    """Image files by extension, any case; hidden files and folders (.DS_Store, ._foo.jpg, .ipynb_checkpoints/) are skipped.

    Every candidate is checked (:func:`_check_data_file`), so a broken link is an error, not a silently missing image;
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
            _check_data_file(path, data_root)  # a broken link raises here
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


def _check_declared(name: str, what: str, dtype: np.dtype, shape: tuple[int, ...], spatial: tuple[int, ...]) -> None:
    """Refuse from a file's metadata, before any data is read: a tiny file can declare a huge array.

    ``spatial``: the dimensions whose product is the image's pixel count, held to the picture loader's limit.
    """
    if dtype.kind not in "biuf":  # bool, signed, unsigned, float: no strings, complex, records or times
        raise PipelineError(f"{name}: {what} has dtype {dtype}; expected real numbers (integers or floats)")
    if 0 in shape:
        raise PipelineError(f"{name}: {what} has shape {shape}, which holds no pixels")
    if math.prod(spatial) > MAX_PIXELS:
        raise PipelineError(
            f"{name}: {what} declares shape {shape}: {math.prod(spatial):,} pixels exceed {MAX_PIXELS:,}; downsample it first"
        )


def _read_h5(source: Path | io.BytesIO, name: str | None = None, with_mask: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """A BraTS slice's image and mask, checked: the mask decides the label, so a mask that is not plain
    finite numbers would silently label the slice (NaN > 0 is False: "normal").

    Dtypes and shapes are checked from the datasets' metadata before anything is read. ``source`` may be an
    in-memory file (a served request, which needs no mask: ``with_mask=False``); ``name`` is what errors call it.
    """
    import h5py

    name = name or shown(source)
    keys = ("image", "mask") if with_mask else ("image",)
    try:
        with h5py.File(source, "r") as handle:
            missing = [key for key in keys if not isinstance(handle.get(key), h5py.Dataset)]
            if missing:
                raise PipelineError(
                    f"{name}: no dataset(s) {missing} (keys found: {sorted(handle.keys())}); BraTS slices need 'image' (H,W,4) and 'mask' (H,W,3)"
                )
            image_set = handle["image"]
            _check_declared(name, "'image'", image_set.dtype, image_set.shape, image_set.shape[:2])
            if image_set.ndim != 3 or image_set.shape[-1] != len(BRATS_MODALITIES):
                raise PipelineError(f"{name}: 'image' has shape {image_set.shape}; expected (H, W, 4) with channels {BRATS_MODALITIES}")
            mask = None
            if with_mask:
                mask_set = handle["mask"]
                _check_declared(name, "'mask'", mask_set.dtype, mask_set.shape, mask_set.shape[:2])
                if mask_set.shape != image_set.shape[:2] + (3,):
                    raise PipelineError(
                        f"{name}: 'mask' has shape {mask_set.shape}; expected {image_set.shape[:2] + (3,)} (H, W, 3), like the image"
                    )
                mask = np.asarray(mask_set)
            image = np.asarray(image_set)
    # h5py: OSError for an unreadable file, RuntimeError or KeyError for a damaged one; numpy: a dtype it cannot represent
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as error:
        raise PipelineError(f"{name}: not a readable HDF5 file ({_one_line(error)}); remove or replace it") from error
    if mask is not None and not np.all(np.isfinite(mask)):
        raise PipelineError(f"{name}: 'mask' has NaN or infinite values, so the slice's label is unknown; fix or remove the file")
    return image, mask


def _brats_rows(root: Path, files: list[Path]) -> list[dict]:
    rows = []
    for path in files:
        _check_data_file(path, root)
        _, mask = _read_h5(path)
        volume = BRATS_PATTERN.search(path.name).group(1)
        rows.append({"path": str(path), "label": "tumor" if np.any(mask > 0) else "normal", "group": f"volume_{volume}", "given_split": ""})
    return rows


def _nifti_errors() -> tuple[type[BaseException], ...]:
    """What nibabel raises on a file that is not (or no longer) valid NIfTI: bad header, truncated gzip, ..."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    return (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # nibabel's messages span lines; errors print as one


def _squeezed(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """``shape`` without the trailing length-1 axes beyond ``ndim`` (NIfTI writers pad dimensions with 1s)."""
    while len(shape) > ndim and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _load_nifti_volume(path: Path):
    """A NIfTI volume (lazy: nothing but the header read), refused from its header if it is not a 3-D array
    of real numbers within ``MAX_PIXELS`` voxels; volumes are decoded whole, so the limit is on voxels."""
    import nibabel

    try:
        image = nibabel.load(path)
        shape, dtype = _squeezed(tuple(image.shape), 3), image.get_data_dtype()
    except _nifti_errors() as error:
        raise PipelineError(f"{path}: not a readable NIfTI file ({_one_line(error)}); remove or replace it") from None
    _check_declared(str(path), "the volume", dtype, shape, shape)
    if len(shape) != 3:
        raise PipelineError(f"{path}: NIfTI shape {tuple(image.shape)}; expected a 3-D volume (X, Y, Z), sliced axially")
    return image


def _nifti_array(image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The volume's voxels as float32 (scaling applied) and its affine, reoriented to RAS (nibabel's closest
    canonical orientation), so the third axis is the axial one whatever order the file stores the axes in."""
    import nibabel

    try:
        canonical = nibabel.as_closest_canonical(image)
        return canonical.get_fdata(dtype=np.float32).reshape(_squeezed(canonical.shape, 3)), canonical.affine
    except _nifti_errors() as error:
        raise PipelineError(f"{path}: cannot read the NIfTI data ({_one_line(error)}); the file may be truncated, replace it") from None


@functools.lru_cache(maxsize=1)
def _nifti_volume(path: str, stamp: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A volume's voxels and its RAS affine; cached for the next slice of the same file (rows are sorted by path,
    so a volume's slices come one after another). ``stamp`` (mtime, size) makes a rewritten file a new entry."""
    return _nifti_array(_load_nifti_volume(Path(path)), Path(path))


def _nifti_slice(path: Path, z: int) -> tuple[np.ndarray, np.ndarray]:
    """Axial slice ``z`` of a volume, float32, and the slice's affine (the volume's, moved to ``z``)."""
    try:
        stat = path.stat()
    except OSError as error:
        raise PipelineError(f"{path}: cannot read the volume ({error.strerror}); it was listed in the manifest") from None
    volume, affine = _nifti_volume(str(path), (stat.st_mtime_ns, stat.st_size))
    if not 0 <= z < volume.shape[2]:
        raise PipelineError(f"{path}#z={z}: the volume has {volume.shape[2]} axial slices")
    moved = affine.copy()
    moved[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, z]) + affine[:3, 3]
    return np.array(volume[..., z]), moved


def _slice_sha256(pixels: np.ndarray) -> str:
    """A slice's identity: its float32 pixels and shape (byte-identical slices share it, as identical files do)."""
    return hashlib.sha256(f"{pixels.shape}".encode() + np.ascontiguousarray(pixels, dtype=np.float32).tobytes()).hexdigest()


def _nifti_rows(root: Path, files: list[Path], modality: int) -> list[dict]:
    """One row per kept axial slice of every case: label from the case's segmentation, group = the case.

    Slice selection: a slice is kept when its brain, the voxels above the volume's minimum (BraTS volumes are
    skull-stripped on a zero background), covers at least ``NIFTI_MIN_BRAIN_FRACTION`` (a quarter) of the
    case's largest brain slice. This drops the empty slices above and below the head and the thin caps at its
    top and bottom, which show too little tissue for a 2-D classifier to judge and would flood the "normal"
    class with trivially empty images. The rule reads only the image, never the segmentation, so it cannot
    choose slices by their label; it is deterministic and scales with each head's size.
    """
    cases: dict[tuple[Path, str], dict[str, Path]] = {}
    for path in files:
        match = NIFTI_PATTERN.match(path.name)
        cases.setdefault((path.parent, match["case"]), {})[match["kind"].lower()] = path
    import nibabel

    wanted = BRATS_MODALITIES[modality]
    rows = []
    for (folder, case), kinds in sorted(cases.items()):
        if wanted not in kinds or "seg" not in kinds:
            missing = [f"{case}_{kind}.nii.gz" for kind in (wanted, "seg") if kind not in kinds]
            raise PipelineError(
                f"{folder}: case {case!r} has no {' or '.join(missing)} (found {sorted(kinds)}); "
                f"every case needs modality={wanted!r} and its segmentation, which labels the slices"
            )
        image_path, seg_path = kinds[wanted], kinds["seg"]
        for path in (image_path, seg_path):
            _check_data_file(path, root)
        image, seg = _load_nifti_volume(image_path), _load_nifti_volume(seg_path)
        if image.shape != seg.shape:
            raise PipelineError(
                f"{seg_path}: shape {seg.shape} differs from {image_path.name}'s {image.shape}; the segmentation must cover the same voxels"
            )
        orientations = nibabel.aff2axcodes(image.affine), nibabel.aff2axcodes(seg.affine)
        if orientations[0] != orientations[1]:
            raise PipelineError(
                f"{seg_path}: orientation {orientations[1]} differs from {image_path.name}'s {orientations[0]}; resample one onto the other"
            )
        stat = image_path.stat()
        volume, _ = _nifti_volume(str(image_path), (stat.st_mtime_ns, stat.st_size))
        segmentation, _ = _nifti_array(seg, seg_path)
        if not np.all(np.isfinite(segmentation)):
            raise PipelineError(
                f"{seg_path}: segmentation has NaN or infinite values, so the slices' labels are unknown; fix or remove the case"
            )
        if not np.all(np.isfinite(volume)):
            raise PipelineError(f"{image_path}: volume has NaN or infinite voxels; fix or remove the case")
        area = (volume > volume.min()).sum(axis=(0, 1))
        if area.max() == 0:
            raise PipelineError(f"{image_path}: every voxel has the same value, so there is no brain to slice; fix or remove the case")
        tumour = (segmentation > 0).any(axis=(0, 1))
        width = len(str(volume.shape[2] - 1))  # zero-padded, so sorting by path keeps slices in order
        for z in np.flatnonzero(area >= NIFTI_MIN_BRAIN_FRACTION * area.max()):
            rows.append(
                {
                    "path": f"{image_path}#z={z:0{width}d}",
                    "label": "tumor" if tumour[z] else "normal",
                    "group": case,
                    "sha256": _slice_sha256(volume[..., z]),
                    "given_split": "",
                }
            )
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
        from pipelines.synthetic import ensure_synthetic_dataset

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
            rows = _brats_rows(root, brats_files)
        elif nifti_files:
            source, modality = "nifti", modality_index(cfg.modality)
            rows = _nifti_rows(root, nifti_files, modality)
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

    identity = "\n".join(f"{s},{l},{g},{t}" for s, l, g, t in manifest[["sha256", "label", "group", "given_split"]].itertuples(index=False))
    identity += f"\nmodality={modality}\n"
    digest = hashlib.sha256(identity.encode()).hexdigest()
    return Dataset(manifest, class_names, positive, source, root, modality, digest)


def decode_image(path: Path | str | io.BytesIO, modality: int | None = None, name: str | None = None) -> np.ndarray:
    """A 2-D float32 intensity image of a manifest row or file, decoded by content (a PNG named .jpg is fine).

    A row ``<volume>.nii.gz#z=<k>`` is axial slice k of a NIfTI volume; a file is read by :func:`decode_bytes`'s
    rules (HDF5 needs ``modality``, the channel). ``path`` may be an in-memory file; ``name`` is what error
    messages call it (default: the path).
    """
    if isinstance(path, io.BytesIO):
        return decode_bytes(path.getvalue(), name or str(path), modality)
    name = name or shown(path)
    volume_slice = _volume_slice(path)
    if volume_slice:
        pixels, _ = _nifti_slice(*volume_slice)
        return _finite(pixels, name)
    try:
        with open(path, "rb") as handle:
            kind = _sniff(handle.read(NIFTI2_HEADER_BYTES))
    except OSError as error:
        raise PipelineError(f"{name}: cannot read the file ({error.strerror}); check that it exists and is readable") from None
    if kind == "picture":
        return _finite(_decode_picture(path, name), name)
    if kind == "hdf5":
        return _finite(_h5_channel(Path(path), modality, name), name)
    return decode_bytes(Path(path).read_bytes(), name, modality)


def decode_bytes(payload: bytes, name: str = "image", modality: int | None = None) -> np.ndarray:
    """A 2-D float32 image from an in-memory file (what the served model receives), sniffed by content:

    - HDF5 (a BraTS ``.h5`` slice): channel ``modality`` of its ``image`` (H, W, 4); refused without one;
    - NIfTI-1/2, plain or gzipped, holding one 2-D slice (H, W), (H, W, 1), ...: its voxels as stored;
    - anything else: a picture Pillow reads (JPEG, PNG, TIFF, ...), any mode.

    Sizes and types are checked from headers before decoding, with the ``MAX_PIXELS`` limit.
    """
    kind = _sniff(payload)
    if kind == "hdf5":
        pixels = _h5_channel(io.BytesIO(payload), modality, name)
    elif kind == "picture":
        pixels = _decode_picture(io.BytesIO(payload), name)
    else:
        pixels = _nifti_2d(payload, kind == "gzip", name)
    return _finite(pixels, name)


def _volume_slice(path: Path | str) -> tuple[Path, int] | None:
    """(volume, z) for a NIfTI slice row ``<volume>#z=<k>``; None for a file (one may really be named so)."""
    match = NIFTI_SLICE.match(str(path))
    return (Path(match["file"]), int(match["z"])) if match and not Path(path).exists() else None


def row_file(path: Path | str) -> Path:
    """The file a manifest row is read from: the row itself, or for a NIfTI slice row its volume."""
    volume_slice = _volume_slice(path)
    return volume_slice[0] if volume_slice else Path(path)


def request_bytes(path: Path | str) -> bytes:
    """What a client sends the served model for a manifest row: the file itself (a picture or a BraTS ``.h5``
    slice), or for a NIfTI slice row a gzipped in-memory NIfTI of that one 2-D slice (float32, with its affine),
    which :func:`decode_bytes` reads back to exactly the pixels :func:`decode_image` gives for the row."""
    volume_slice = _volume_slice(path)
    if not volume_slice:
        return Path(path).read_bytes()
    import nibabel

    pixels, affine = _nifti_slice(*volume_slice)
    return gzip.compress(nibabel.Nifti1Image(pixels, affine).to_bytes(), mtime=0)


def _finite(pixels: np.ndarray, name: str) -> np.ndarray:
    # Float TIFFs, HDF5 slices and NIfTI can hold NaN or infinity (or float64 values beyond float32's range).
    if not np.all(np.isfinite(pixels)):
        raise PipelineError(f"{name}: image has NaN or infinite pixels (or values beyond float32's range); fix or remove the file")
    return pixels


def _sniff(head: bytes) -> str:
    """``hdf5``, ``gzip`` (a gzipped NIfTI, the only gzip we read), ``nifti`` or ``picture``, from the first bytes."""
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    return "nifti" if _nifti_header_class(head) else "picture"


def _nifti_header_class(head: bytes):
    """nibabel's header class for a single-file NIfTI-1 (``n+1``) or NIfTI-2 (``n+2``) header, else None."""
    if len(head) >= 348 and head[344:348] == b"n+1\x00" and head[:4] in (struct.pack("<i", 348), struct.pack(">i", 348)):
        from nibabel import Nifti1Header

        return Nifti1Header
    if len(head) >= NIFTI2_HEADER_BYTES and head[4:8] == b"n+2\x00" and head[:4] in (struct.pack("<i", 540), struct.pack(">i", 540)):
        from nibabel import Nifti2Header

        return Nifti2Header
    return None


def _nifti_2d(payload: bytes, gzipped: bool, name: str) -> np.ndarray:
    """One 2-D slice from NIfTI bytes; the header is checked before anything else is decompressed or read."""
    import nibabel

    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    with _quiet(nibabel.imageglobals.logger):
        try:
            head = inflater.decompress(payload, NIFTI2_HEADER_BYTES) if gzipped else payload[:NIFTI2_HEADER_BYTES]
            header_class = _nifti_header_class(head)
            if header_class is None:
                what = "a gzip file that is not NIfTI" if gzipped else "not a NIfTI file"
                raise PipelineError(f"{name}: {what}; send a picture, a BraTS .h5 slice or a NIfTI slice")
            header = header_class.from_fileobj(io.BytesIO(head))
            shape, dtype = tuple(header.get_data_shape()), header.get_data_dtype()
            _check_declared(name, "the NIfTI image", dtype, shape, shape)
            if len(_squeezed(shape, 2)) != 2:
                raise PipelineError(f"{name}: NIfTI shape {shape}; send one 2-D slice (H, W), not a volume")
            offset = int(header.get_data_offset())
            if not 0 <= offset <= 1 << 20:  # the header and its extensions; anything larger is not a slice
                raise PipelineError(f"{name}: NIfTI data offset {offset} is outside 0..{1 << 20}; send a plain NIfTI slice")
            raw = payload
            if gzipped:  # decompress no further than the declared data ends: a small gzip can inflate to gigabytes
                end = offset + math.prod(shape) * dtype.itemsize
                raw = head + inflater.decompress(inflater.unconsumed_tail, end - len(head)) if end > len(head) else head
            image = (nibabel.Nifti2Image if header_class is nibabel.Nifti2Header else nibabel.Nifti1Image).from_bytes(raw)
            return image.get_fdata(dtype=np.float32).reshape(_squeezed(shape, 2))
        except _nifti_errors() as error:
            raise PipelineError(f"{name}: cannot decode NIfTI ({_one_line(error)}); send a complete file") from None


@contextmanager
def _quiet(logger: logging.Logger):
    """nibabel logs each damaged header field it repairs (to stderr): a request is refused or answered, not logged
    field by field. (nibabel's own LoggingOutputSuppressor leaves the messages to Python's last-resort handler.)"""
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _h5_channel(source: Path | io.BytesIO, modality: int | None, name: str) -> np.ndarray:
    if modality is None:
        raise PipelineError(
            f"{name}: a BraTS .h5 slice, but no modality is known (the model was not trained on BraTS slices); send a picture"
        )
    image, _ = _read_h5(source, name, with_mask=False)
    return image[..., modality].astype(np.float32)


def _decode_picture(path: Path | io.BytesIO, name: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise PipelineError(f"{name}: {image.width}x{image.height} exceeds {MAX_PIXELS} pixels; downscale it first")
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                return np.asarray(image, dtype=np.float32)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                # Transparent pixels are background: composite on black rather than on the palette's colour.
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
            return np.asarray(image.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise PipelineError(f"{name}: cannot decode image ({error}); remove or replace the file") from error


def head_box(image: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns of the head's bounding box, ignoring dark background and scanner text at the edges.

    The threshold is a fraction of a robust maximum, and a row/column counts only when enough of it is
    bright, so isolated annotation pixels or noise do not stretch the box. No head found: the whole image.
    """
    whole = (slice(0, image.shape[0]), slice(0, image.shape[1]))
    high = np.percentile(image, 99.5)
    if high <= image.min():
        return whole
    mask = image > image.min() + 0.1 * (high - image.min())
    rows = np.flatnonzero(mask.mean(axis=1) > 0.02)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.02)
    if rows.size < 8 or cols.size < 8:
        return whole
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def crop_to_head(image: np.ndarray) -> np.ndarray:
    """Crop to :func:`head_box` (Grad-CAM maps a heat map back onto the scan through the same box)."""
    return image[head_box(image)]


def preprocess(image: np.ndarray, image_size: int) -> np.ndarray:
    """Crop to the head, pad to a square (keeping the aspect ratio), resize, normalise per image.

    Returns ``(image_size, image_size, 1)`` float32 with zero mean and unit variance, so scanners with
    different intensity ranges look alike to the network.
    """
    if not np.all(np.isfinite(image)):
        raise PipelineError("image has NaN or infinite pixels; fix the source file")
    head = crop_to_head(image)
    height, width = head.shape
    side = max(height, width)
    square = np.full((side, side), head.min(), dtype=np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = head
    resized = np.asarray(Image.fromarray(square, mode="F").resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.float32)
    # Statistics in float64: in float32 the squares of pixels beyond ~1e19 overflow, and an infinite std
    # silently flattened such an image to zeros (found by tests/test_fuzz.py).
    pixels = resized.astype(np.float64)
    normalised = ((pixels - pixels.mean()) / (pixels.std() + 1e-6)).astype(np.float32)
    if not np.all(np.isfinite(normalised)):  # left: resizing values at float32's very limit (~3.4e38) overflows
        raise PipelineError(
            f"pixel values span {image.min():.3g} to {image.max():.3g}, too close to float32's limit to resize; rescale the image"
        )
    return normalised[..., None]


def load_images(dataset: Dataset, image_size: int, cache_dir: Path | str) -> np.ndarray:
    """Every image decoded and preprocessed once, ``(N, S, S, 1)``; cached on disk by digest and size."""
    cache = Path(cache_dir) / "arrays" / f"{dataset.digest[:16]}-{image_size}px-v{PREPROCESS_VERSION}.npy"
    if cache.exists():
        return np.load(cache)
    images = np.stack([_load_image(Path(p), dataset.modality, image_size) for p in _progress(dataset.manifest["path"], "decoding images")])
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".{np.random.default_rng().integers(1 << 30)}.tmp.npy")
    np.save(partial, images)
    partial.replace(cache)  # atomic: concurrent workers never read a half-written cache
    return images


def _load_image(path: Path, modality: int | None, image_size: int) -> np.ndarray:
    """One manifest image decoded and preprocessed; errors name the file."""
    image = decode_image(path, modality)
    try:
        return preprocess(image, image_size)
    except PipelineError as error:
        raise PipelineError(f"{path}: {error}") from None


def _progress(items, description: str):
    from tqdm.auto import tqdm

    return tqdm(list(items), desc=description, unit="img", leave=False, mininterval=1.0)


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """A perceptual hash per preprocessed image ``(N, S, S, 1)``: ``(N, 143)`` bits (pHash).

    Each image (already cropped to the head, squared and normalised) is resized to 32x32; of its 2-D DCT the
    12x12 lowest frequencies but the constant one are kept, and each bit says whether that coefficient is
    above their median. Low frequencies survive JPEG re-encoding and small rescaling, while different scans
    differ in them (the thresholds are in ``NEAR_DUPLICATE_BITS``). A plain 8x8 difference hash was measured
    too and rejected: the flat background of MRIs makes its bits noise, so different scans were 1 bit apart.
    """
    hashes = []
    for image in images:
        small = np.asarray(
            Image.fromarray(image[..., 0], mode="F").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BILINEAR), dtype=np.float64
        )
        low = dctn(small, norm="ortho")[:HASH_FREQUENCIES, :HASH_FREQUENCIES].reshape(-1)[1:]
        hashes.append(low > np.median(low))
    return np.asarray(hashes, dtype=bool).reshape(len(images), HASH_FREQUENCIES**2 - 1)


def _close_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(i, j, distance)`` for every hash ``a[i]`` within ``NEAR_DUPLICATE_BITS`` of ``b[j]``, computed in row
    blocks so memory stays bounded for tens of thousands of images."""
    from pipelines.evaluate import in_batches

    ones_b, zeros_b = b.astype(np.float32).T, (~b).astype(np.float32).T

    def block(rows: np.ndarray) -> np.ndarray:
        block_a = a[rows].astype(np.float32)
        distance = np.rint(block_a @ zeros_b + (1 - block_a) @ ones_b).astype(np.int64)  # Hamming: bits that differ
        i, j = np.nonzero(distance <= NEAR_DUPLICATE_BITS)
        return np.stack([rows[i], j, distance[i, j]], axis=1)

    return in_batches(block, np.arange(len(a)), 1024) if len(a) else np.empty((0, 3), dtype=np.int64)


def duplicate_groups(dataset: Dataset, hashes: np.ndarray) -> np.ndarray:
    """The manifest's groups with near-duplicates joined: rows connected by identical groups or by hashes within
    ``NEAR_DUPLICATE_BITS`` (transitively) share one group, named by its first member's group."""
    groups = dataset.manifest["group"].to_numpy()
    codes = pd.factorize(groups)[0]
    pairs = _close_pairs(hashes, hashes)
    n = len(groups)
    # One node per row and per group: a row is linked to its group and to its near-duplicates.
    edges = np.concatenate([np.stack([np.arange(n), n + codes], axis=1), pairs[:, :2]])
    _, component = connected_components(
        coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n + codes.max() + 1,) * 2), directed=False
    )
    first = pd.Series(np.arange(n)).groupby(component[:n]).transform("min").to_numpy()
    return groups[first]


def holdout_duplicates(dataset: Dataset, hashes: np.ndarray, test: np.ndarray) -> pd.DataFrame:
    """Hold-out rows that duplicate a training row: one row each with its closest training image.

    ``kind`` is ``identical`` (same sha256, distance 0) or ``near`` (perceptual hashes within
    ``NEAR_DUPLICATE_BITS``; ``distance`` in bits). Indexed by the hold-out row.
    """
    train = np.setdiff1d(np.arange(len(dataset.manifest)), test)
    paths, sha = dataset.manifest["path"].to_numpy(), dataset.manifest["sha256"].to_numpy()
    pairs = _close_pairs(hashes[test], hashes[train])  # identical files decode alike: always among them, at distance 0
    test_rows, train_rows, distance = test[pairs[:, 0]], train[pairs[:, 1]], pairs[:, 2]
    identical = sha[test_rows] == sha[train_rows]
    # Per hold-out row its closest training image, an identical file first: the first pair of each row after sorting.
    order = np.lexsort((~identical, distance, test_rows))
    _, first = np.unique(test_rows[order], return_index=True)
    best = order[first]
    frame = pd.DataFrame(
        {
            "row": test_rows[best],
            "test_path": paths[test_rows[best]],
            "train_path": paths[train_rows[best]],
            "kind": np.where(identical[best], "identical", "near"),
            "distance": distance[best],
        }
    )
    return frame.set_index("row")


def make_splits(
    dataset: Dataset, folds: int, test_fraction: float, seed: int, hashes: np.ndarray | None = None, dedupe: str = "drop"
) -> Splits:
    """Hold-out test split (the data's own, else stratified by group), then stratified group k-fold.

    Groups (patients, volumes, identical files) never straddle the test split or two folds. Given the images'
    :func:`perceptual_hashes`, near-identical images join one group too (:func:`duplicate_groups`), and a
    given test split (``Testing/``) is checked against the training images (:func:`holdout_duplicates`):
    ``dedupe`` = ``drop`` leaves those hold-out rows out of every part, ``keep`` keeps them in the hold-out,
    ``error`` refuses the data. Deterministic for a seed.
    """
    if dedupe not in DEDUPE_MODES:
        raise PipelineError(f"dedupe={dedupe!r}: use one of {', '.join(DEDUPE_MODES)}")
    labels, groups = dataset.labels, dataset.manifest["group"].to_numpy()
    if hashes is not None:
        groups = duplicate_groups(dataset, hashes)
    given = dataset.manifest["given_split"].to_numpy()
    duplicates, dropped = None, np.empty(0, dtype=np.int64)
    if (given == "test").any():
        test = np.flatnonzero(given == "test")
        if hashes is not None:
            duplicates = holdout_duplicates(dataset, hashes, test)
            if len(duplicates) and dedupe == "error":
                first = duplicates.iloc[0]
                raise PipelineError(
                    f"{len(duplicates)} hold-out image(s) duplicate training images ({describe_duplicates(duplicates)}), e.g. {shown(first['test_path'])} and "
                    f"{shown(first['train_path'])}; remove them from the test folder, or pass dedupe=drop (leave them out) or dedupe=keep"
                )
            if dedupe == "drop":
                dropped = duplicates.index.to_numpy(np.int64)
                test = np.setdiff1d(test, dropped)
                if not len(test):
                    raise PipelineError(
                        f"{dataset.root}: every hold-out image duplicates a training image; give the test folder images of its own"
                    )
    else:
        n_test_splits = max(2, round(1 / test_fraction))
        _check_enough(dataset, np.arange(len(labels)), n_test_splits, "the hold-out split", groups)
        splitter = StratifiedGroupKFold(n_splits=n_test_splits, shuffle=True, random_state=seed)
        _, test = next(splitter.split(np.zeros(len(labels)), labels, groups))
    rest = np.setdiff1d(np.arange(len(labels)), np.concatenate([test, dropped]))
    _check_enough(dataset, rest, folds, f"folds={folds}", groups)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_indices = [(rest[train], rest[val]) for train, val in splitter.split(np.zeros(len(rest)), labels[rest], groups[rest])]
    return Splits(test=np.sort(test), folds=fold_indices, dropped=np.sort(dropped), duplicates=duplicates, groups=groups)


def describe_duplicates(duplicates: pd.DataFrame) -> str:
    """``3 identical, 1 near-identical``: the duplicate table's kinds, counted."""
    counts = duplicates["kind"].value_counts()
    return f"{counts.get('identical', 0)} identical, {counts.get('near', 0)} near-identical within {NEAR_DUPLICATE_BITS} hash bits"


def _check_enough(dataset: Dataset, rows: np.ndarray, n_splits: int, what: str, groups: np.ndarray) -> None:
    frame = dataset.manifest.iloc[rows].assign(group=groups[rows])
    for name in dataset.class_names:
        n_groups = frame.loc[frame["label"] == name, "group"].nunique()
        if n_groups < n_splits:
            raise PipelineError(
                f"class {name!r} has {n_groups} image group(s) where {what} needs at least {n_splits}; add images or lower folds"
            )
