"""The readers of volumes and slices: BraTS2020 ``.h5`` slices (image and mask, checked: the mask labels the slice) and
NIfTI volumes read as axial slices (``<volume>#z=<index>`` rows), each checked from its header before its data is read
(``MAX_PIXELS``). Ingest (:mod:`pipelines.data.sources`) lists their rows; decoding (:mod:`pipelines.data.images`)
reads them."""

from __future__ import annotations

import functools
import hashlib
import io
import math
import re
import zlib
from pathlib import Path

import numpy as np

from pipelines.config import BRATS_MODALITIES, PipelineError
from pipelines.data.files import MAX_PIXELS, check_data_file, shown

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_DIR_NAMES = {"training": "train", "train": "train", "testing": "test", "test": "test"}
BRATS_PATTERN = re.compile(r"volume_(\d+)_slice_(\d+)\.h5$")
# BraTS NIfTI cases: one file per modality and a segmentation, all named after the case.
NIFTI_PATTERN = re.compile(r"^(?P<case>.+)_(?P<kind>flair|t1|t1ce|t2|seg)\.nii(\.gz)?$", re.IGNORECASE)
# Slice selection: a slice is kept when its brain covers at least this fraction of the case's largest slice.
NIFTI_MIN_BRAIN_FRACTION = 0.25
POSITIVE_NAMES = {"yes", "tumor", "tumour", "tumors", "tumours", "positive", "pos", "abnormal", "malignant", "lesion", "1", "true"}
NEGATIVE_NAMES = {"no", "normal", "healthy", "negative", "neg", "no_tumor", "no_tumour", "notumor", "notumour", "no-tumor", "0", "false"}

BRATS_PATTERN = re.compile(r"volume_(\d+)_slice_(\d+)\.h5$")
# BraTS NIfTI cases: one file per modality and a segmentation, all named after the case.
NIFTI_PATTERN = re.compile(r"^(?P<case>.+)_(?P<kind>flair|t1|t1ce|t2|seg)\.nii(\.gz)?$", re.IGNORECASE)
# Slice selection: a slice is kept when its brain covers at least this fraction of the case's largest slice.
NIFTI_MIN_BRAIN_FRACTION = 0.25


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


def brats_rows(root: Path, files: list[Path]) -> list[dict]:
    rows = []
    for path in files:
        check_data_file(path, root)
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


def nifti_rows(root: Path, files: list[Path], modality: int) -> list[dict]:
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
            check_data_file(path, root)
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
