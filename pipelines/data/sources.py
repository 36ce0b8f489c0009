"""Data sources: from a folder of scans (or a CSV manifest) to one manifest and the digest that identifies the data.

``ingest`` turns any supported source into one manifest (path, label, group, sha256, given split) and a digest.
Sources: a folder per class (flat, or ``Training/`` + ``Testing/``), BraTS2020 ``.h5`` slices, BraTS NIfTI cases
(``<case>/<case>_flair.nii.gz`` ... ``<case>_seg.nii.gz``, read as axial slices), a CSV manifest, and (``data_dir``
empty) the embedded synthetic set, which is read back through the folder loader.

A manifest row is a file, except for NIfTI, where it is one axial slice of a volume: ``<volume>#z=<index>``.
Every file is checked before its data is read: its name, its links, and the array types and sizes its header
declares (``MAX_PIXELS``). The readers of BraTS slices and NIfTI volumes live here because ingest needs them
(masks label slices, volumes are sliced); decoding (:mod:`pipelines.data.images`) builds on them.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import BRATS_MODALITIES, Config, PipelineError, modality_index

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_DIR_NAMES = {"training": "train", "train": "train", "testing": "test", "test": "test"}
BRATS_PATTERN = re.compile(r"volume_(\d+)_slice_(\d+)\.h5$")
# BraTS NIfTI cases: one file per modality and a segmentation, all named after the case.
NIFTI_PATTERN = re.compile(r"^(?P<case>.+)_(?P<kind>flair|t1|t1ce|t2|seg)\.nii(\.gz)?$", re.IGNORECASE)
# Slice selection: a slice is kept when its brain covers at least this fraction of the case's largest slice.
NIFTI_MIN_BRAIN_FRACTION = 0.25
POSITIVE_NAMES = {"yes", "tumor", "tumour", "tumors", "tumours", "positive", "pos", "abnormal", "malignant", "lesion", "1", "true"}
NEGATIVE_NAMES = {"no", "normal", "healthy", "negative", "neg", "no_tumor", "no_tumour", "notumor", "notumour", "no-tumor", "0", "false"}
# Decompression-bomb guard: the largest real scans here are 1920x1080; 50 Mpx leaves room, refuses bombs.
MAX_PIXELS = 50_000_000


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


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB chunks so large volumes never sit in memory whole."""
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


def check_declared(name: str, what: str, dtype: np.dtype, shape: tuple[int, ...], spatial: tuple[int, ...]) -> None:
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


def read_h5(source: Path | io.BytesIO, name: str | None = None, with_mask: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
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
                    f"{name}: no dataset(s) {missing} (keys found: {sorted(handle.keys())}); "
                    "BraTS slices need 'image' (H,W,4) and 'mask' (H,W,3)"
                )
            image_set = handle["image"]
            check_declared(name, "'image'", image_set.dtype, image_set.shape, image_set.shape[:2])
            if image_set.ndim != 3 or image_set.shape[-1] != len(BRATS_MODALITIES):
                raise PipelineError(f"{name}: 'image' has shape {image_set.shape}; expected (H, W, 4) with channels {BRATS_MODALITIES}")
            mask = None
            if with_mask:
                mask_set = handle["mask"]
                check_declared(name, "'mask'", mask_set.dtype, mask_set.shape, mask_set.shape[:2])
                if mask_set.shape != image_set.shape[:2] + (3,):
                    raise PipelineError(
                        f"{name}: 'mask' has shape {mask_set.shape}; expected {image_set.shape[:2] + (3,)} (H, W, 3), like the image"
                    )
                mask = np.asarray(mask_set)
            image = np.asarray(image_set)
    # h5py: OSError for an unreadable file, RuntimeError or KeyError for a damaged one; numpy: a dtype it cannot represent
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as error:
        raise PipelineError(f"{name}: not a readable HDF5 file ({one_line(error)}); remove or replace it") from error
    if mask is not None and not np.all(np.isfinite(mask)):
        raise PipelineError(f"{name}: 'mask' has NaN or infinite values, so the slice's label is unknown; fix or remove the file")
    return image, mask


def _brats_rows(root: Path, files: list[Path]) -> list[dict]:
    rows = []
    for path in files:
        _check_data_file(path, root)
        _, mask = read_h5(path)
        volume = BRATS_PATTERN.search(path.name).group(1)
        rows.append({"path": str(path), "label": "tumor" if np.any(mask > 0) else "normal", "group": f"volume_{volume}", "given_split": ""})
    return rows


def nifti_errors() -> tuple[type[BaseException], ...]:
    """What nibabel raises on a file that is not (or no longer) valid NIfTI: bad header, truncated gzip, ..."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    return (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)


def one_line(error: BaseException) -> str:
    """An error's message on one line (nibabel's messages span lines; ours print as one)."""
    return " ".join(str(error).split())


def squeezed(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
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
        shape, dtype = squeezed(tuple(image.shape), 3), image.get_data_dtype()
    except nifti_errors() as error:
        raise PipelineError(f"{path}: not a readable NIfTI file ({one_line(error)}); remove or replace it") from None
    check_declared(str(path), "the volume", dtype, shape, shape)
    if len(shape) != 3:
        raise PipelineError(f"{path}: NIfTI shape {tuple(image.shape)}; expected a 3-D volume (X, Y, Z), sliced axially")
    return image


def _nifti_array(image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The volume's voxels as float32 (scaling applied) and its affine, reoriented to RAS (nibabel's closest
    canonical orientation), so the third axis is the axial one whatever order the file stores the axes in."""
    import nibabel

    try:
        canonical = nibabel.as_closest_canonical(image)
        return canonical.get_fdata(dtype=np.float32).reshape(squeezed(canonical.shape, 3)), canonical.affine
    except nifti_errors() as error:
        raise PipelineError(f"{path}: cannot read the NIfTI data ({one_line(error)}); the file may be truncated, replace it") from None


@functools.lru_cache(maxsize=1)
def _nifti_volume(path: str, stamp: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A volume's voxels and its RAS affine; cached for the next slice of the same file (rows are sorted by path,
    so a volume's slices come one after another). ``stamp`` (mtime, size) makes a rewritten file a new entry."""
    return _nifti_array(_load_nifti_volume(Path(path)), Path(path))


def nifti_slice(path: Path, z: int) -> tuple[np.ndarray, np.ndarray]:
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

    identity = "\n".join(
        f"{sha},{label},{group},{split}"
        for sha, label, group, split in manifest[["sha256", "label", "group", "given_split"]].itertuples(index=False)
    )
    identity += f"\nmodality={modality}\n"
    digest = hashlib.sha256(identity.encode()).hexdigest()
    return Dataset(manifest, class_names, positive, source, root, modality, digest)
