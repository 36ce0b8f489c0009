"""Decoding and preprocessing: the one contract between training and serving.

:func:`decode_image` reads a manifest row (a file, or a NIfTI slice row ``<volume>#z=<index>``), :func:`decode_bytes`
what a client sends the served model (:func:`request_bytes` gives it for a row). Files are decoded by content,
never by name: HDF5 (BraTS slices), NIfTI (plain or gzipped) or a picture. :func:`preprocess` crops to the head,
squares, resizes and normalises; training (:func:`load_images`, which decodes every image once and caches the
arrays on disk), serving (``registry/model.py``) and Grad-CAM (``registry/explain.py``) all go through it, so a
served scan is prepared as the training scans were: exactly, except that the server decodes a JPEG much larger than
the model's input at reduced scale (:func:`draft_scale`), within a tolerance tests/test_images.py checks on real scans.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import re
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.config import PipelineError
from pipelines.data.files import MAX_PIXELS, shown
from pipelines.data.sources import Dataset
from pipelines.data.volumes import check_declared, nifti_errors, nifti_slice, one_line, read_h5, squeezed
from pipelines.fingerprint import SOURCE_ROOT, fingerprint_sources

NIFTI_SLICE = re.compile(r"^(?P<file>.+\.nii(\.gz)?)#z=(?P<z>\d+)$", re.IGNORECASE)
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
GZIP_MAGIC = b"\x1f\x8b"
NIFTI2_HEADER_BYTES = 540  # NIfTI-1 headers are 348 bytes, NIfTI-2 headers 540: enough bytes to sniff either
# head_box looks at the image averaged over blocks of a power of two pixels, fewer than 2x this many blocks a side.
HEAD_BOX_SIDE = 128
# A JPEG is decoded at reduced scale (1/2, 1/4, 1/8: libjpeg scales in the DCT, at a fraction of the cost) only while
# every output pixel still gets at least this many decoded pixels a side, and head_box still averages blocks of at
# least 2x2 decoded pixels: then the preprocessed image stays within tests/test_images.py's tolerance of the full decode.
DRAFT_PIXELS_PER_OUTPUT = 4


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
        pixels, _ = nifti_slice(*volume_slice)
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


def decode_bytes(payload: bytes, name: str = "image", modality: int | None = None, image_size: int | None = None) -> np.ndarray:
    """A 2-D float32 image from an in-memory file (what the served model receives), sniffed by content:

    - HDF5 (a BraTS ``.h5`` slice): channel ``modality`` of its ``image`` (H, W, 4); refused without one;
    - NIfTI-1/2, plain or gzipped, holding one 2-D slice (H, W), (H, W, 1), ...: its voxels as stored;
    - anything else: a picture Pillow reads (JPEG, PNG, TIFF, ...), any mode.

    Sizes and types are checked from headers before decoding, with the ``MAX_PIXELS`` limit. ``image_size``: the size
    the image will be preprocessed to; a JPEG much larger is then decoded at reduced scale (:func:`draft_scale`).
    """
    kind = _sniff(payload)
    if kind == "hdf5":
        pixels = _h5_channel(io.BytesIO(payload), modality, name)
    elif kind == "picture":
        pixels = _decode_picture(io.BytesIO(payload), name, image_size)
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

    pixels, affine = nifti_slice(*volume_slice)
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
            check_declared(name, "the NIfTI image", dtype, shape, shape)
            if len(squeezed(shape, 2)) != 2:
                raise PipelineError(f"{name}: NIfTI shape {shape}; send one 2-D slice (H, W), not a volume")
            offset = int(header.get_data_offset())
            if not 0 <= offset <= 1 << 20:  # the header and its extensions; anything larger is not a slice
                raise PipelineError(f"{name}: NIfTI data offset {offset} is outside 0..{1 << 20}; send a plain NIfTI slice")
            raw = payload
            if gzipped:  # decompress no further than the declared data ends: a small gzip can inflate to gigabytes
                end = offset + math.prod(shape) * dtype.itemsize
                raw = head + inflater.decompress(inflater.unconsumed_tail, end - len(head)) if end > len(head) else head
            image = (nibabel.Nifti2Image if header_class is nibabel.Nifti2Header else nibabel.Nifti1Image).from_bytes(raw)
            return image.get_fdata(dtype=np.float32).reshape(squeezed(shape, 2))
        except nifti_errors() as error:
            raise PipelineError(f"{name}: cannot decode NIfTI ({one_line(error)}); send a complete file") from None


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
    image, _ = read_h5(source, name, with_mask=False)
    return image[..., modality].astype(np.float32)


def _box_factor(height: int, width: int) -> int:
    """The block side (a power of two) :func:`head_box` averages an image of this size over."""
    factor = 1
    while max(height, width) // (2 * factor) >= HEAD_BOX_SIDE:
        factor *= 2
    return factor


def draft_scale(width: int, height: int, image_size: int) -> int:
    """The reduced scale (1, 2, 4 or 8) a JPEG of this size may be decoded at for ``image_size``: the largest that leaves
    ``DRAFT_PIXELS_PER_OUTPUT`` decoded pixels per output pixel and at most half :func:`head_box`'s block side."""
    scale = 8
    while scale > 1 and (min(width, height) // scale < DRAFT_PIXELS_PER_OUTPUT * image_size or 2 * scale > _box_factor(height, width)):
        scale //= 2
    return scale


def _decode_picture(path: Path | io.BytesIO, name: str, image_size: int | None = None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise PipelineError(f"{name}: {image.width}x{image.height} exceeds {MAX_PIXELS} pixels; downscale it first")
            scale = draft_scale(image.width, image.height, image_size) if image_size and image.format == "JPEG" else 1
            if scale > 1:
                # Requesting W // scale makes Pillow pick exactly this scale; an RGB JPEG is decoded straight to grey (L).
                image.draft("L", (image.width // scale, image.height // scale))
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
    bright, so isolated annotation pixels or noise do not stretch the box. It is found on the image averaged
    over blocks of ``_box_factor`` pixels a side (fewer than ``2 * HEAD_BOX_SIDE`` blocks a side), so that lines
    thinner than a block do not count either, and the box is the same whether a JPEG was decoded at full or at
    reduced scale. No head found: the whole image.
    """
    height, width = image.shape
    whole = (slice(0, height), slice(0, width))
    factor = _box_factor(height, width)
    blocks = image
    if factor > 1:
        blocks = image[: height // factor * factor, : width // factor * factor]
        blocks = blocks.reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3), dtype=np.float64)
    high = np.percentile(blocks, 99.5)
    if high <= blocks.min():
        return whole
    mask = blocks > blocks.min() + 0.1 * (high - blocks.min())
    rows = np.flatnonzero(mask.mean(axis=1) > 0.02)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.02)
    if rows.size < 8 or cols.size < 8:
        return whole
    return slice(rows[0] * factor, min(height, (rows[-1] + 1) * factor)), slice(cols[0] * factor, min(width, (cols[-1] + 1) * factor))


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
    """Every image decoded and preprocessed once, ``(N, S, S, 1)``; cached on disk by digest, size and the source of
    this module (an edit to decoding or preprocessing never reads arrays the old code made: no version to bump by hand)."""
    code = fingerprint_sources(SOURCE_ROOT, ("pipelines/data/images.py",))[:12]
    cache = Path(cache_dir) / "arrays" / f"{dataset.digest[:16]}-{image_size}px-{code}.npy"
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
