"""Bad input, fuzzed: the data loader, the configuration and the served model over generated broken input (hypothesis).

Every generated input must end in one of two ways: a clear error naming the file or request row (a
PipelineError for the loader, MlflowException INVALID_PARAMETER_VALUE, HTTP 400, for the served model),
or a correct answer, checked against an oracle where one exists (a truncated file that decodes must equal
the whole file; an accepted CSV manifest must hold exactly the rows written). Never another exception,
never a NaN probability. Each test records what it tried and how it ended in RELIABILITY.md.

Examples are derandomized (the same inputs every run, so a failure reproduces and reports stay
comparable) and kept few enough for two CPU cores.
"""

from __future__ import annotations

import base64
import csv
import gzip
import io
import json
import os
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from kdtest import tracking_at
from mlflow.exceptions import MlflowException
from PIL import Image

from pipelines.config import LIMITS, Config, PipelineError
from pipelines.data.files import MAX_PIXELS, shown
from pipelines.data.images import crop_to_head, decode_bytes, decode_image, load_images
from pipelines.data.sources import IMAGE_EXTENSIONS, ingest

# Function-scoped fixtures (tmp_path, reliability) are shared by all examples of a test on purpose.
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif", "WEBP": ".webp"}


class Tally:
    """Outcomes of one test's generated examples, for its RELIABILITY.md row."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()

    def __call__(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def summary(self) -> str:
        total = sum(self.outcomes.values())
        return f"{total} generated examples: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.outcomes.items()))


def _refused(error: PipelineError, named: str | Path) -> str:
    """A loader error must name the file; returns the outcome label."""
    assert str(named) in str(error), f"the error does not name {named}: {error}"
    return "refused with PipelineError naming the file"


def _encoded(fmt: str, seed: int, width: int, height: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


images = st.tuples(st.sampled_from(sorted(FORMATS)), st.integers(0, 2**16), st.integers(8, 48), st.integers(8, 48))


def _cfg(data_dir: Path, tmp: Path, **changes) -> Config:
    return Config(data_dir=str(data_dir), cache_dir=str(tmp / "cache"), folds=2, **changes)


def _class_folder(root: Path, per_class: int = 2) -> Path:
    """A valid yes/no folder dataset; tests add one generated file to it."""
    for label in ("yes", "no"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            (root / label / f"{label} {k}.png").write_bytes(_encoded("PNG", hash((label, k)) % 1000, 16, 16))
    return root


# ------------------------------------------------------------------------------------------ data loader


def test_truncated_images_are_refused_or_decoded_whole(tmp_path: Path, reliability) -> None:
    tally = Tally()

    @FUZZ
    @given(image=images, fraction=st.floats(0.0, 1.0, exclude_max=True))
    def check(image, fraction):
        fmt, seed, width, height = image
        payload = _encoded(fmt, seed, width, height)
        path = tmp_path / f"scan {fmt}{FORMATS[fmt]}"
        path.write_bytes(payload[: int(fraction * len(payload))])  # 0 bytes included
        try:
            decoded = decode_image(path)
        except PipelineError as error:
            tally(_refused(error, path))
        else:  # only cut trailing bytes the decoder never needed: then the pixels must be all there
            np.testing.assert_array_equal(decoded, decode_bytes(payload))
            tally("decoded identical to the whole file")

    check()
    reliability.bad_input(
        "truncated image files (PNG, JPEG, BMP, GIF, TIFF, WebP; 0 bytes up to all but one), data loader", tally.summary()
    )


def test_corrupted_images_are_refused_or_decode_to_a_valid_image(tmp_path: Path, reliability) -> None:
    """Flipped bytes: PNG (checksummed) must be refused or unchanged; formats without checksums may decode to
    other pixels, which no decoder can notice (the data digest, a sha256 of the files, does change)."""
    tally = Tally()

    @FUZZ
    @given(image=images, flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1, max_size=6))
    def check(image, flips):
        fmt, seed, width, height = image
        payload = _encoded(fmt, seed, width, height)
        corrupted = bytearray(payload)
        for position, mask in flips:
            corrupted[position % len(corrupted)] ^= mask
        assume(bytes(corrupted) != payload)
        path = tmp_path / f"scan{FORMATS[fmt]}"
        path.write_bytes(bytes(corrupted))
        try:
            decoded = decode_image(path)
        except PipelineError as error:
            tally(_refused(error, path))
            return
        assert decoded.ndim == 2 and decoded.dtype == np.float32 and np.all(np.isfinite(decoded)) and decoded.size <= MAX_PIXELS
        if fmt == "PNG" or np.array_equal(decoded, decode_bytes(payload)):
            np.testing.assert_array_equal(decoded, decode_bytes(payload))
            tally("decoded identical (flip in bytes the decoder ignores)")
        else:
            tally(f"decoded to other pixels ({fmt}: no checksum in the format)")

    check()
    reliability.bad_input("corrupted image files (1-6 bytes flipped), data loader", tally.summary())


def test_zero_byte_files_in_a_folder_are_named(tmp_path: Path, reliability) -> None:
    root = _class_folder(tmp_path / "scans")
    assert load_images(ingest(_cfg(root, tmp_path)), 32, tmp_path / "cache").shape == (4, 32, 32, 1)
    tally = Tally()
    names = st.text(st.characters(categories=("L", "N", "Zs"), exclude_characters="/"), min_size=1, max_size=12)

    @settings(FUZZ, max_examples=25)
    @given(
        name=names,
        extension=st.sampled_from(sorted(IMAGE_EXTENSIONS)).map(lambda e: e.upper() if len(e) % 2 else e),
        label=st.sampled_from(["yes", "no"]),
    )
    def check(name, extension, label):
        path = root / label / f"empty {name}{extension}"
        path.write_bytes(b"")
        try:
            dataset = ingest(_cfg(root, tmp_path))
            assert str(path) in set(dataset.manifest["path"])
            with pytest.raises(PipelineError) as error:
                load_images(dataset, 32, tmp_path / "cache")
            tally(_refused(error.value, path))
        finally:
            path.unlink()

    check()
    reliability.bad_input("zero-byte image files in a class folder, ingest + load_images", tally.summary())


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _patched(fmt: str, width: int, height: int) -> bytes:
    """A tiny real file whose header claims ``width x height`` (a decompression bomb's header)."""
    if fmt == "PNG":
        return _png_header(width, height)
    buffer = io.BytesIO()
    Image.new("L", (4, 4)).save(buffer, format=fmt)
    payload = bytearray(buffer.getvalue())
    if fmt == "BMP":
        payload[18:26] = struct.pack("<ii", width, height)
    elif fmt == "GIF":
        payload[6:10] = struct.pack("<HH", width, height)
    else:  # TIFF, little-endian: ImageWidth (256) and ImageLength (257) entries, type LONG, count 1
        for tag, value in ((256, width), (257, height)):
            entry = struct.pack("<HHI", tag, 4, 1)
            at = payload.index(entry) + len(entry)
            payload[at : at + 4] = struct.pack("<I", value)
    return bytes(payload)


# Width and height up to 65535 (GIF's limit) with width * height over MAX_PIXELS.
bomb_sizes = st.integers(MAX_PIXELS // 65535 + 1, 65535).flatmap(lambda w: st.tuples(st.just(w), st.integers(MAX_PIXELS // w + 1, 65535)))


def test_decompression_bombs_are_refused_before_decoding(tmp_path: Path, reliability) -> None:
    tally = Tally()

    @FUZZ
    @given(fmt=st.sampled_from(["PNG", "BMP", "GIF", "TIFF"]), size=bomb_sizes)
    def check(fmt, size):
        width, height = size
        path = tmp_path / f"bomb{FORMATS[fmt]}"
        path.write_bytes(_patched(fmt, width, height))
        with pytest.raises(PipelineError) as error:
            decode_image(path)
        message = str(error.value)
        assert f"{width}x{height} exceeds {MAX_PIXELS}" in message or "decompression bomb" in message, message
        tally(_refused(error.value, path) + " (pixel limit)")

    check()
    reliability.bad_input(
        f"decompression-bomb headers (PNG, BMP, GIF, TIFF; over {MAX_PIXELS:,} pixels, up to 65535x65535), data loader",
        tally.summary(),
    )


def _at_float32_limit(array: np.ndarray) -> bool:
    """Pixels within a factor 10 of float32's largest value: resizing them may overflow, so refusal is allowed."""
    return bool(np.abs(array.astype(np.float64)).max() > np.finfo(np.float32).max / 10)


PIXEL_KINDS = {  # PIL mode: numpy dtype of the generated pixels
    "L": np.uint8,
    "I;16": np.uint16,
    "I": np.int32,
    "F": np.float32,
}


SPECIAL_FLOATS = [np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e30, -1e19, 1e-45]


@st.composite
def _pixels(draw, mode: str) -> np.ndarray:
    """Any values of the mode's dtype; float images also get a few NaN, infinities or extremes planted."""
    dtype = PIXEL_KINDS[mode]
    elements = st.floats(width=32, allow_nan=True, allow_infinity=True) if mode == "F" else None
    array = draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=24), elements=elements))
    if mode == "F":
        for position, value in draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIAL_FLOATS)), max_size=3)):
            array.flat[position % array.size] = value
    return array


def test_pixel_values_of_every_depth_load_finite_or_are_named(tmp_path: Path, reliability) -> None:
    """8/16/32-bit integer and float TIFFs with any values, NaN and infinities included, through ingest + load_images."""
    root = _class_folder(tmp_path / "scans")
    tally = Tally()

    @settings(FUZZ, max_examples=60)
    @given(pixels=st.sampled_from(["L", "I;16", "I", "F", "F", "F"]).flatmap(lambda mode: st.tuples(st.just(mode), _pixels(mode))))
    def check(pixels):
        mode, array = pixels
        path = root / "yes" / "generated.tif"
        Image.fromarray(array).save(path, format="TIFF")  # the mode follows the dtype
        dataset = ingest(_cfg(root, tmp_path))
        try:
            loaded = load_images(dataset, 32, tmp_path / "cache")
        except PipelineError as error:
            assert not np.all(np.isfinite(array)) or _at_float32_limit(array), f"a valid image was refused: {error}"
            tally(_refused(error, path) + (" (NaN/inf pixels)" if not np.all(np.isfinite(array)) else " (pixels at float32's limit)"))
        else:
            assert np.all(np.isfinite(array)), "NaN or infinite pixels were accepted"
            generated = loaded[dataset.manifest.index[dataset.manifest["path"] == str(path)][0]]
            assert loaded.shape == (5, 32, 32, 1) and np.all(np.isfinite(loaded))
            # z-scored: std 1 wherever the cropped head has real contrast (the 1e-6 in the divisor damps only
            # near-flat images); an overflow once flattened high-contrast images to zeros.
            contrast = np.ptp(crop_to_head(decode_image(path)).astype(np.float64))
            assert abs(float(generated.std()) - 1.0) < 1e-2 if contrast > 1 else float(generated.std()) < 1.01, (contrast, generated.std())
            tally(f"loaded finite and normalised ({mode})")

    check()
    reliability.bad_input(
        "pixel values of every depth (uint8, uint16, int32, float32 with NaN/inf/extremes) in TIFFs, ingest + load_images", tally.summary()
    )


H5_DTYPES = ["float32", "float64", "int16", "uint8", "bool", "complex64", "bytes", "str", "record"]


def _h5_array(dtype: str, shape: tuple[int, ...], draw_values) -> np.ndarray:
    if dtype == "bytes":
        return np.full(shape, b"ab", dtype="S2")
    if dtype == "str":
        import h5py

        return np.full(shape, "ab", dtype=object).astype(h5py.string_dtype())
    if dtype == "record":
        return np.zeros(shape, dtype=[("a", "f4"), ("b", "i4")])
    if dtype == "complex64":
        return np.full(shape, 1 + 1j, dtype=np.complex64)
    return draw_values(
        hnp.arrays(
            np.dtype(dtype),
            shape,
            elements=st.floats(allow_nan=True, allow_infinity=True, width=64 if dtype == "float64" else 32)
            if dtype.startswith("float")
            else None,
        )
    )


def test_brats_slices_with_wrong_dtypes_shapes_and_values(tmp_path: Path, reliability) -> None:
    """BraTS .h5 slices with generated image and mask arrays: the mask decides the label, so an accepted
    slice must carry exactly the label its mask says, and the loaded image must be finite."""
    import h5py

    root = tmp_path / "brats"
    root.mkdir()
    for volume in (1, 2, 3):
        for index in (0, 1):
            with h5py.File(root / f"volume_{volume}_slice_{index}.h5", "w") as handle:
                handle["image"] = np.random.default_rng(volume).random((8, 8, 4)).astype(np.float32)
                handle["mask"] = np.full((8, 8, 3), index, np.uint8)
    path = root / "volume_9_slice_0.h5"
    tally = Tally()
    shapes = st.sampled_from([(8, 8, 4)] * 5 + [(8, 8, 3), (8, 8), (8, 8, 4, 1), (0,)])
    mask_shapes = st.sampled_from([(8, 8, 3)] * 5 + [(8, 8), (4, 4, 3), ()])

    @settings(FUZZ, max_examples=60)
    # Weighted towards the real dtypes, so that valid slices (and their labels) are checked too.
    @given(
        image_dtype=st.sampled_from(["float32"] * 4 + H5_DTYPES),
        image_shape=shapes,
        mask_dtype=st.sampled_from(["uint8"] * 4 + H5_DTYPES),
        mask_shape=mask_shapes,
        draw=st.data(),
    )
    def check(image_dtype, image_shape, mask_dtype, mask_shape, draw):
        image = _h5_array(image_dtype, image_shape, draw.draw)
        mask = _h5_array(mask_dtype, mask_shape, draw.draw)
        with h5py.File(path, "w") as handle:
            handle["image"], handle["mask"] = image, mask
        real = lambda array: array.dtype.kind in "biuf"  # noqa: E731
        valid = real(image) and image.shape == (8, 8, 4) and real(mask) and mask.shape == (8, 8, 3) and np.all(np.isfinite(mask))
        try:
            dataset = ingest(_cfg(root, tmp_path))
            loaded = load_images(dataset, 32, tmp_path / "cache")
        except PipelineError as error:
            flair = image[..., 0].astype(np.float32) if valid else None
            assert not valid or not np.all(np.isfinite(flair)) or _at_float32_limit(flair), f"a valid slice was refused: {error}"
            tally(_refused(error, path))
            return
        assert valid, f"accepted image {image.dtype}{image.shape}, mask {mask.dtype}{mask.shape}"
        label = dataset.manifest.set_index("path").loc[str(path.resolve()), "label"]
        assert label == ("tumor" if np.any(mask > 0) else "normal")
        assert np.all(np.isfinite(loaded))
        tally("accepted with the label its mask gives")

    check()
    reliability.bad_input(
        "BraTS .h5 slices: image/mask of wrong dtypes (bool, int, float, complex, bytes, str, records), shapes and NaN/inf values",
        tally.summary(),
    )


# Declared shapes over MAX_PIXELS per slice: as BraTS .h5 'image' (H, W, 4) or as NIfTI (H, W) / (H, W, D).
huge_planes = st.integers(MAX_PIXELS // 200_000 + 1, 200_000).flatmap(
    lambda h: st.tuples(st.just(h), st.integers(MAX_PIXELS // h + 1, 200_000))
)


def _declared_h5(path: Path, plane: tuple[int, int], dtype: str) -> bytes:
    """A tiny .h5 whose datasets declare huge arrays: chunked and never written, so no data is stored."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle.create_dataset("image", shape=(*plane, 4), dtype=dtype, chunks=(8, 8, 4))
        handle.create_dataset("mask", shape=(*plane, 3), dtype="uint8", chunks=(8, 8, 3))
    return path.read_bytes()


def _declared_nifti(shape: tuple[int, ...], dtype: str) -> bytes:
    """A gzipped NIfTI header (version 2 when a side exceeds NIfTI-1's 32767) declaring ``shape``, with no data."""
    import nibabel

    header = (nibabel.Nifti2Header if max(shape) > 32767 else nibabel.Nifti1Header)()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    buffer = io.BytesIO()
    header.write_to(buffer)
    return gzip.compress(buffer.getvalue() + b"\0" * 4)


def test_oversized_declared_h5_and_nifti_are_refused_from_their_headers(tmp_path: Path, served, reliability) -> None:
    """Tiny files declaring arrays of up to 200000x200000 pixels (the .h5 of the hardening report: 1.6 kB for
    596 GiB of float32) are refused from their metadata, naming the file, by the loader and the served model,
    before anything is allocated: a read would fail with MemoryError, or take minutes."""
    import time

    from brats_cases import write_nifti_cases

    write_nifti_cases(tmp_path / "nifti", cases=2, depth=2)
    h5_root = tmp_path / "h5"
    h5_root.mkdir()
    slowest = Tally()
    tally = Tally()

    @settings(FUZZ, max_examples=15)
    @example(plane=(200_000, 200_000), dtype="float32", depth=4)  # the report's file
    @given(plane=huge_planes, dtype=st.sampled_from(["float32", "float64", "uint8", "int16"]), depth=st.integers(1, 155))
    def check(plane, dtype, depth):
        start = time.monotonic()
        h5_path = h5_root / "volume_1_slice_0.h5"
        h5_bytes = _declared_h5(h5_path, plane, dtype)
        with pytest.raises(PipelineError) as error:
            ingest(_cfg(h5_root, tmp_path))
        assert "exceed" in str(error.value), error.value
        tally(_refused(error.value, h5_path) + " (.h5, loader)")
        volume = tmp_path / "nifti" / "Case_001" / "Case_001_flair.nii.gz"
        volume.write_bytes(_declared_nifti((*plane, depth), dtype))
        with pytest.raises(PipelineError) as error:
            ingest(_cfg(tmp_path / "nifti", tmp_path))
        assert "exceed" in str(error.value), error.value
        tally(_refused(error.value, volume) + " (NIfTI volume, loader)")
        for what, payload in ((".h5", h5_bytes), ("NIfTI slice", _declared_nifti(plane, dtype))):
            outcome = _answer_or_400(served.model.predict, _frame(payload))
            assert outcome.startswith("refused"), what
            tally(f"{what}, served model: {outcome}")
        elapsed = time.monotonic() - start
        assert elapsed < 30, f"{elapsed:.0f} s to refuse a header: data was read"
        slowest(f"{elapsed:.1f} s")

    check()
    worst = max(float(text.split()[0]) for text in slowest.outcomes)
    reliability.bad_input(
        "oversized declared arrays: tiny .h5 and NIfTI files declaring up to 200000x200000 pixels, loader and served model",
        tally.summary() + f"; slowest example {worst:.1f} s for all four",
    )


def test_non_utf8_file_names_are_refused_with_a_printable_message(tmp_path: Path, reliability) -> None:
    root = _class_folder(tmp_path / "scans")
    image = (root / "yes" / "yes 0.png").read_bytes()
    tally = Tally()

    def not_utf8(raw: bytes) -> bool:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    names = st.binary(min_size=1, max_size=16).filter(
        lambda raw: b"/" not in raw and b"\0" not in raw and not raw.startswith(b".") and not_utf8(raw)
    )

    @settings(FUZZ, max_examples=25)
    @given(raw=names, label=st.sampled_from(["yes", "no"]))
    def check(raw, label):
        path = os.path.join(os.fsencode(root / label), raw + b".png")
        with open(path, "wb") as handle:
            handle.write(image)
        try:
            with pytest.raises(PipelineError) as error:
                ingest(_cfg(root, tmp_path))
            message = str(error.value)
            message.encode("utf-8")  # printable: no lone surrogates from the raw name
            assert shown(os.fsdecode(path)) in message and "rename" in message
            tally("refused with PipelineError naming the file (bytes shown as \\x escapes)")
        finally:
            os.unlink(path)

    check()
    reliability.bad_input("non-UTF-8 file names (raw bytes) in a class folder, ingest", tally.summary())


def test_symlinks_out_of_the_data_dir_are_refused(tmp_path: Path, reliability) -> None:
    root = _class_folder(tmp_path / "scans")
    outside = _class_folder(tmp_path / "elsewhere")
    tally = Tally()

    @settings(FUZZ, max_examples=25)
    @given(
        kind=st.sampled_from(["file outside", "folder outside", "dangling", "loop", "file inside"]),
        label=st.sampled_from(["yes", "no"]),
        nested=st.booleans(),
    )
    def check(kind, label, nested):
        folder = root / label / ("sub" if nested else "")
        folder.mkdir(exist_ok=True)
        link = folder / ("linked" if kind == "folder outside" else "linked.png")
        target = {
            "file outside": outside / "yes" / "yes 0.png",
            "folder outside": outside / "yes",
            "dangling": tmp_path / "gone.png",
            "loop": link,
            "file inside": root / "no" / "no 1.png",
        }[kind]
        link.symlink_to(target)
        try:
            if kind == "file inside":
                assert str(link) in set(ingest(_cfg(root, tmp_path)).manifest["path"])
                tally("link inside the data dir: accepted")
                return
            with pytest.raises(PipelineError) as error:
                ingest(_cfg(root, tmp_path))
            tally(_refused(error.value, link) + f" ({kind})")
        finally:
            link.unlink()

    check()
    reliability.bad_input(
        "symbolic links in class folders (to files/folders outside data_dir, dangling, loops; inside as control), ingest", tally.summary()
    )


# A CSV manifest's rows: (path kind, label kind). Good kinds must be accepted, any bad kind refused.
PATH_KINDS = {
    "good": True,
    "good with spaces": True,
    "absolute inside": True,
    "../ outside": False,
    "absolute outside": False,
    "missing": False,
    "NUL byte": False,
    "too long": False,
    "folder": False,
}
LABEL_KINDS = {"yes": True, "no": True, " no ": True, "": False, "  ": False}


def test_csv_manifests_are_exact_or_refused(tmp_path: Path, reliability) -> None:
    """Generated manifests (columns, rows, encodings); the oracle says whether each is valid and what it holds."""
    root = _class_folder(tmp_path / "set", per_class=3)
    (root / "odd, name").mkdir()
    shutil.copy(root / "yes" / "yes 0.png", root / "odd, name" / 'scan "a".png')
    outside = tmp_path / "outside.png"
    shutil.copy(root / "no" / "no 0.png", outside)
    goods = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    manifest = root / "manifest.csv"
    tally = Tally()

    def path_text(kind: str, index: int) -> str:
        good = goods[index % len(goods)]
        return {
            "good": good,
            "good with spaces": goods[-1],
            "absolute inside": str(root / good),
            "../ outside": "../outside.png",
            "absolute outside": str(outside),
            "missing": "no/missing.png",
            "NUL byte": "yes/a\0.png",
            "too long": "x" * 300 + ".png",
            "folder": "yes",
        }[kind]

    # Weighted towards valid parts, so that about half the manifests are valid and the oracle sees both outcomes.
    path_kinds = st.sampled_from(["good"] * 12 + sorted(PATH_KINDS))
    label_kinds = st.sampled_from(["yes", "no"] * 6 + sorted(LABEL_KINDS))
    rows = st.lists(
        st.tuples(path_kinds, st.integers(0, 20), label_kinds, st.sampled_from(["", "p1", "p2"])),
        min_size=0,
        max_size=5,
        unique_by=lambda row: row[1] % len(goods),
    )
    rarely = lambda *values: st.sampled_from([values[0]] * 8 + list(values[1:]))  # noqa: E731

    @settings(FUZZ, max_examples=60)
    @given(
        rows=rows,
        group=st.booleans(),
        extra=st.sampled_from(["", "site"]),
        drop=rarely("", "path", "label"),
        duplicate=rarely(False, True),
        ragged=rarely(0, 1, -1),
        encoding=rarely("utf-8", "utf-8-sig", "latin-1 bytes"),
        order=st.randoms(use_true_random=False),
    )
    def check(rows, group, extra, drop, duplicate, ragged, encoding, order):
        header = [c for c in ["path", "label"] + (["group"] if group else []) + ([extra] if extra else []) if c != drop]
        order.shuffle(header)
        header += [header[0]] if duplicate and header else []
        records = []
        for kind, index, label, group_value in rows:
            values = {"path": path_text(kind, index), "label": label, "group": group_value, "site": "A"}
            records.append([values.get(name, "") for name in header])
        if ragged and records:
            records[-1] = records[-1] + ["x"] if ragged > 0 else records[-1][:-1]
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([header, *records])
        payload = text.getvalue().encode("utf-8-sig" if encoding == "utf-8-sig" else "utf-8")
        if encoding == "latin-1 bytes":
            payload += "café,é\n".encode("latin-1")
        manifest.write_bytes(payload)

        resolved = [(root / path_text(kind, index)).resolve() if PATH_KINDS[kind] else None for kind, index, _, _ in rows]
        labels = [label.strip() for _, _, label, _ in rows]
        valid = (
            encoding != "latin-1 bytes"
            and not drop
            and not duplicate
            and ragged == 0
            and rows
            and all(PATH_KINDS[kind] and LABEL_KINDS[label] for kind, _, label, _ in rows)
            and len(set(resolved)) == len(resolved)
            and set(labels) == {"yes", "no"}
        )
        try:
            dataset = ingest(_cfg(manifest, tmp_path))
        except PipelineError as error:
            assert not valid, f"a valid manifest was refused: {error}"
            tally(_refused(error, manifest))
            return
        assert valid, f"an invalid manifest was accepted: {payload!r}"
        expected = sorted(zip(map(str, resolved), labels))
        assert sorted(zip(dataset.manifest["path"], dataset.manifest["label"])) == expected
        tally("accepted with exactly the rows written")

    check()
    reliability.bad_input(
        "CSV manifests: missing/duplicate columns, ragged rows, bad encodings, paths outside the root/absent/NUL/too long/duplicated, "
        "blank labels",
        tally.summary(),
    )


def test_a_path_listed_twice_in_a_manifest_is_refused(tmp_path: Path) -> None:
    """Twice with different labels the same scan would be both classes at once."""
    root = _class_folder(tmp_path / "set")
    (root / "m.csv").write_text("path,label\nyes/yes 0.png,yes\nno/no 0.png,no\nyes/yes 0.png,no\n")
    with pytest.raises(PipelineError, match=r"m\.csv:4: .*also on line 2"):
        ingest(_cfg(root / "m.csv", tmp_path))


# -------------------------------------------------------------------------------------- configuration


def _outside_range(limits) -> st.SearchStrategy:
    """Values just outside, far outside and not finite, on both sides of a range."""
    width = max(limits.high - limits.low, 1)
    below = (
        st.one_of(st.just(limits.low), st.floats(limits.low - 1e12, limits.low, exclude_max=True))
        if limits.low_open
        else st.floats(limits.low - 1e12, limits.low, exclude_max=True)
    )
    above = (
        st.one_of(st.just(limits.high), st.floats(limits.high, limits.high + 1e12, exclude_min=True))
        if limits.high_open
        else st.floats(limits.high, limits.high + 1e12, exclude_min=True)
    )
    return st.one_of(below, above, st.sampled_from([float("nan"), float("inf"), -float("inf"), limits.high + width * 1e6]))


def _as_field_value(name: str, value: float):
    """An int parameter gets a whole number (rounded away from the range, so it stays outside)."""
    if isinstance(getattr(Config(), name), int) and value == value and abs(value) != float("inf"):
        limits = LIMITS[name]
        return int(value // 1 if value < limits.low else -(-value // 1))
    return value


def test_out_of_range_values_of_every_numeric_parameter_are_refused_by_name(reliability) -> None:
    refused: dict[str, int] = {}

    @settings(FUZZ, max_examples=10)
    @given(data=st.data())
    def check(data):
        for name, limits in LIMITS.items():
            value = _as_field_value(name, data.draw(_outside_range(limits)))
            if value in limits:  # rounding an int can land back inside a half-open range; not an out-of-range case
                continue
            with pytest.raises(PipelineError, match=f"^{name}=") as error:
                Config(**{name: value})
            assert str(limits) in str(error.value), error.value
            refused[name] = refused.get(name, 0) + 1
            inside = _as_field_value(
                name, data.draw(st.floats(limits.low, limits.high, exclude_min=limits.low_open, exclude_max=limits.high_open))
            )
            try:
                Config(**{name: inside})
            except PipelineError as error:  # only a rule between two parameters may refuse it (fold < folds, heartbeat < grace period)
                assert "out of range" not in str(error), error

    check()
    assert set(refused) == set(LIMITS)
    reliability.bad_input(
        f"out-of-range values (just outside, far outside, NaN, ±inf) of all {len(LIMITS)} numeric parameters, Config",
        f"{sum(refused.values())} generated values, all refused with a PipelineError naming the parameter and its range",
    )


# -------------------------------------------------------------------------------------- served model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The pyfunc as the registry serves it: logged by registry.promote.log_student to a temp tracking
    store and loaded back with mlflow.pyfunc.load_model (signature enforcement included)."""
    import mlflow

    from pipelines.models.builders import build_student
    from registry.promote import log_student

    root = tmp_path_factory.mktemp("served")
    with tracking_at(f"sqlite:///{root / 'mlflow.db'}"):
        mlflow.set_experiment("fuzz")
        example = pd.DataFrame({"image": [base64.b64encode(_encoded("PNG", 0, 20, 20)).decode()]})
        # Trained on BraTS flair (modality 0), so .h5 slices are served too and reach their own checks.
        dataset = SimpleNamespace(
            class_names=["no", "yes"],
            positive_class="yes",
            modality=0,
            source="brats",
            root=root,
            manifest=pd.DataFrame({"path": []}),
            digest="0" * 64,
        )
        prepared = SimpleNamespace(dataset=dataset)
        with mlflow.start_run():
            info = log_student(build_student("tiny", 32, 2, seed=3), prepared, Config(image_size=32), example)
        model = mlflow.pyfunc.load_model(info.model_uri)
        yield SimpleNamespace(model=model, wrapper=model.unwrap_python_model(), uri=info.model_uri, tracking_uri=mlflow.get_tracking_uri())


def _answer_or_400(predict, model_input) -> str:
    """A served answer is valid probabilities; a refusal is INVALID_PARAMETER_VALUE. Returns the outcome."""
    try:
        output = predict(model_input)
    except MlflowException as error:
        assert error.error_code == "INVALID_PARAMETER_VALUE", (error.error_code, error.message[:300])
        return "refused with INVALID_PARAMETER_VALUE (HTTP 400)"
    probs = output[["prob_no", "prob_yes"]].to_numpy()
    assert np.all(np.isfinite(probs)) and np.all((probs >= 0) & (probs <= 1)), output
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert list(output["label"]) == list(np.where(probs[:, 1] > 0.5, "yes", "no"))
    return "answered with valid probabilities"


def _frame(*payloads: bytes | str) -> pd.DataFrame:
    return pd.DataFrame({"image": [p if isinstance(p, str) else base64.b64encode(p).decode() for p in payloads]})


def test_served_model_refuses_bad_base64(served, reliability) -> None:
    tally = Tally()
    valid = base64.b64encode(_encoded("PNG", 1, 16, 16)).decode()
    mangled = st.tuples(st.integers(0, len(valid) - 1), st.sampled_from(list("!@#$%^&*()é \n-_~") + ["", "=", "=="])).map(
        lambda edit: valid[: edit[0]] + edit[1] + valid[edit[0] + 1 :]
    )

    @FUZZ
    @given(text=st.one_of(st.text(max_size=200), mangled))
    def check(text):
        outcome = _answer_or_400(served.model.predict, pd.DataFrame({"image": [valid, text]}))
        assert outcome.startswith("refused"), f"{text!r} was answered"
        tally(outcome)

    check()
    reliability.bad_input("served model: random text and mangled base64 (bad characters, padding, truncation)", tally.summary())


def test_served_model_answers_data_uri_images_like_plain_base64(served, reliability) -> None:
    """Browser-style data URIs (``data:image/jpeg;base64,...``, any media type, parameters, letter case) give
    the plain base64's answer; a prefix that is not a base64 data URI is refused."""
    tally = Tally()
    media = st.sampled_from(["", "image/jpeg", "image/png", "image/x-portable-graymap", "application/octet-stream", "text/plain"])
    parameters = st.lists(st.tuples(st.sampled_from(["name", "charset", "x-scan"]), st.text("abc%20.-_0123", max_size=12)), max_size=2)

    @settings(FUZZ, max_examples=24)
    @given(
        image=images,
        media=media,
        parameters=parameters,
        upper=st.booleans(),
        broken=st.sampled_from([None] * 5 + [",", ";base64;", "data:;base65,", " data:;base64,"]),
    )
    def check(image, media, parameters, upper, broken):
        plain = base64.b64encode(_encoded(*image)).decode()
        prefix = "data:" + media + "".join(f";{key}={value}" for key, value in parameters) + ";base64,"
        prefix = prefix.upper() if upper else prefix
        if broken:
            prefix = broken if broken.startswith(("data", " ")) else prefix.replace(";base64,", broken, 1).replace(";BASE64,", broken, 1)
            outcome = _answer_or_400(served.model.predict, pd.DataFrame({"image": [prefix + plain]}))
            assert outcome.startswith("refused"), prefix
            tally(f"broken prefix: {outcome}")
            return
        expected = served.model.predict(pd.DataFrame({"image": [plain]}))
        pd.testing.assert_frame_equal(served.model.predict(pd.DataFrame({"image": [prefix + plain]})), expected)
        tally("data URI: answered like the plain base64")

    check()
    reliability.bad_input(
        "served model: data-URI images (data:<media type>;<params>;base64,..., any case) and broken data-URI prefixes", tally.summary()
    )


def test_served_model_on_truncated_corrupted_and_huge_images(served, reliability) -> None:
    tally = Tally()
    damage = st.one_of(
        st.tuples(st.just("truncated"), st.floats(0.0, 1.0, exclude_max=True)),
        st.tuples(st.just("flipped"), st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1, max_size=4)),
        st.tuples(st.just("bomb"), st.tuples(st.sampled_from(["PNG", "BMP", "GIF", "TIFF"]), bomb_sizes)),
    )

    @FUZZ
    @given(image=images, damage=damage)
    def check(image, damage):
        kind, how = damage
        payload = _encoded(*image)
        if kind == "truncated":
            payload = payload[: int(how * len(payload))]
        elif kind == "flipped":
            payload = bytearray(payload)
            for position, mask in how:
                payload[position % len(payload)] ^= mask
            payload = bytes(payload)
        else:
            payload = _patched(how[0], *how[1])
        outcome = _answer_or_400(served.model.predict, _frame(payload))
        assert kind != "bomb" or outcome.startswith("refused")
        tally(f"{kind}: {outcome}")

    check()
    reliability.bad_input("served model: truncated, byte-flipped and decompression-bomb images", tally.summary())


def test_served_model_on_truncated_and_corrupted_h5_and_nifti_slices(served, tmp_path, reliability) -> None:
    """The formats the served model reads besides pictures, damaged: a BraTS .h5 slice and a NIfTI slice (plain
    NIfTI-1, NIfTI-2, gzipped). Each is answered with valid probabilities or refused with a 400, never a 500
    (h5py raises RuntimeError on some damaged files: 2 in 300 damaged .h5 in a longer run than this one)."""
    import nibabel
    from brats_cases import write_h5_slices

    h5_file = next(iter(write_h5_slices(tmp_path / "h5", volumes=1, slices=2)))
    pixels = (np.random.default_rng(0).random((24, 20)) * 300).astype(np.int16)
    bases = {
        ".h5": h5_file.read_bytes(),
        "NIfTI-1": nibabel.Nifti1Image(pixels, np.eye(4)).to_bytes(),
        "NIfTI-2": nibabel.Nifti2Image(pixels.astype(np.float32), np.eye(4)).to_bytes(),
        "NIfTI .gz": gzip.compress(nibabel.Nifti1Image(pixels, np.eye(4)).to_bytes()),
    }
    tally = Tally()

    @settings(FUZZ, max_examples=60)
    @given(
        kind=st.sampled_from(sorted(bases)),
        cut=st.floats(0.0, 1.0),
        flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), max_size=4),
    )
    def check(kind, cut, flips):
        payload = bytearray(bases[kind][: max(1, int(cut * len(bases[kind])))] if not flips else bases[kind])
        for position, mask in flips:
            payload[position % len(payload)] ^= mask
        tally(f"{kind} {'byte-flipped' if flips else 'truncated'}: {_answer_or_400(served.model.predict, _frame(bytes(payload)))}")

    check()
    reliability.bad_input(
        "served model: truncated and byte-flipped BraTS .h5 slices and NIfTI-1, NIfTI-2 and gzipped NIfTI slices", tally.summary()
    )


cells = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(st.integers(), max_size=3),
)


def test_served_model_refuses_wrong_columns_and_cell_types(served, reliability) -> None:
    tally = Tally()

    @FUZZ
    @given(
        columns=st.lists(st.sampled_from(["image", "Image", "picture", "", "0", "image "]), min_size=1, max_size=3, unique=True),
        values=st.lists(cells, min_size=1, max_size=3),
    )
    def check(columns, values):
        frame = pd.DataFrame({column: values for column in columns})
        outcome = _answer_or_400(served.model.predict, frame)
        assert outcome.startswith("refused"), frame
        tally(outcome)

    check()
    reliability.bad_input(
        "served model: wrong columns and cell types (None, bool, int, float NaN/inf, text, bytes, lists)", tally.summary()
    )


def test_served_model_on_non_finite_pixels_and_array_batches(served, reliability) -> None:
    """Float TIFFs with NaN/inf/extreme pixels as files, and array batches of any dtype and values
    straight into the wrapper (the array path skips the DataFrame signature)."""
    tally = Tally()
    floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
    dtypes = st.sampled_from(["float32", "float64", "float16", "int64", "uint8", "bool", "complex64", "timedelta64[s]"])

    @settings(FUZZ, max_examples=60)
    @given(
        pixels=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=16), elements=floats),
        batch=st.tuples(dtypes, st.integers(1, 3), st.sampled_from([32, 16])).flatmap(
            lambda spec: hnp.arrays(
                np.dtype(spec[0]), (spec[1], spec[2], spec[2], 1), elements=floats if spec[0].startswith("float") else None
            )
        ),
    )
    def check(pixels, batch):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="TIFF")  # mode F
        outcome = _answer_or_400(served.model.predict, _frame(buffer.getvalue()))
        assert np.all(np.isfinite(pixels)) or outcome.startswith("refused"), "NaN/inf pixels were answered"
        tally(f"float TIFF: {outcome}")
        outcome = _answer_or_400(lambda array: served.wrapper.predict(None, array), batch)
        finite = batch.dtype.kind in "iuf" and np.all(np.isfinite(batch.astype(np.float64)))
        assert finite or outcome.startswith("refused"), f"a {batch.dtype} batch with non-finite values was answered"
        tally(f"array batch: {outcome}")

    check()
    reliability.bad_input(
        "served model: float TIFFs with NaN/inf/extreme pixels; array batches of wrong dtypes (bool, complex, timedelta), shapes and "
        "NaN/inf/huge values",
        tally.summary(),
    )


@pytest.mark.slow
def test_mlflow_models_serve_answers_fuzzed_requests_with_400(served, reliability) -> None:
    """The same bad requests over HTTP to a real `mlflow models serve` process: each gets 400, and the
    server still answers a good request afterwards."""
    from kdtest import _post

    from registry.server import serve_model

    server, port = serve_model(served.uri, served.tracking_uri)
    tally = Tally()
    try:
        body = lambda frame: json.dumps(
            {"dataframe_split": {"columns": list(frame.columns), "data": frame.to_numpy().tolist()}}, default=str
        ).encode()  # noqa: E731
        requests = st.one_of(
            st.text(max_size=50).map(lambda text: ("text as image", body(pd.DataFrame({"image": [text]})))),
            st.tuples(images, st.floats(0.0, 1.0, exclude_max=True)).map(
                lambda spec: ("truncated image", body(_frame(_encoded(*spec[0])[: int(spec[1] * 200)])))
            ),
            st.tuples(st.sampled_from(["PNG", "BMP", "GIF", "TIFF"]), bomb_sizes).map(
                lambda spec: ("decompression bomb", body(_frame(_patched(spec[0], *spec[1]))))
            ),
            st.lists(st.text(max_size=8), min_size=1, max_size=3, unique=True)
            .filter(lambda c: "image" not in c)
            .map(lambda columns: ("wrong columns", body(pd.DataFrame({c: ["x"] for c in columns})))),
            st.binary(max_size=40).map(lambda raw: ("raw bytes as JSON", raw)),
        )

        @settings(FUZZ, max_examples=25)
        @given(request=requests)
        def check(request):
            what, payload = request
            status, answer = _post(port, payload)
            assert status == 400, (what, status, answer)
            tally(f"{what}: HTTP 400")

        check()
        good = base64.b64encode(_encoded("PNG", 5, 30, 30)).decode()
        status, answer = _post(port, json.dumps({"dataframe_split": {"columns": ["image"], "data": [[good]]}}).encode())
        assert status == 200 and np.isfinite(answer["predictions"][0]["prob_yes"])
        assert server.poll() is None, "the server died"
    finally:
        server.terminate()
        server.wait(timeout=30)
    reliability.bad_input(
        "HTTP requests to `mlflow models serve` (text, truncated images, bombs, wrong columns, non-JSON)",
        tally.summary() + "; server alive and answering afterwards",
    )


def _post_with_type(port: int, body: bytes, content_type: str | None) -> tuple[int, bytes]:
    """POST /invocations with exactly this Content-Type, or none at all (urllib would add one)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.putrequest("POST", "/invocations")
        if content_type is not None:
            connection.putheader("Content-Type", content_type)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.slow
def test_the_wrapped_scoring_server_answers_missing_and_wrong_content_types_with_4xx(served, reliability) -> None:
    """``kd serve`` (MLflow's scoring app plus a Content-Type rule): no header, an empty one, other
    types, charsets and parameters all get 4xx (MLflow's own server answers a missing header with 500); a good
    request still gets the in-process model's answer."""
    from registry.server import serve_model

    server, port = serve_model(served.uri, served.tracking_uri, wrapped=True)
    tally = Tally()
    good = base64.b64encode(_encoded("PNG", 5, 30, 30)).decode()
    request = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[good]]}}).encode()
    header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
    content_types = st.one_of(
        st.none(),
        st.just(""),
        st.sampled_from(
            [
                "text/plain",
                "application/xml",
                "multipart/form-data",
                "application/jsonx",
                "application/json; charset=latin-1",
                "application/json; boundary=x",
                "text/csv; charset=utf-16",
            ]
        ),
        header_text.filter(lambda text: text.split(";")[0].strip() not in ("application/json", "text/csv", "application/x-parquet")),
    )
    try:

        @settings(FUZZ, max_examples=25)
        @given(content_type=content_types, body=st.one_of(st.just(request), st.binary(max_size=40)))
        def check(content_type, body):
            status, answer = _post_with_type(port, body, content_type)
            assert 400 <= status < 500, (content_type, status, answer[:300])
            tally(f"{'missing' if content_type is None else 'wrong'} Content-Type: HTTP {status}")

        check()
        status, answer = _post_with_type(port, request, "application/json")
        assert status == 200, answer[:300]
        served_answer = pd.DataFrame(json.loads(answer)["predictions"])
        expected = served.model.predict(pd.DataFrame({"image": [good]}))
        np.testing.assert_allclose(
            served_answer[["prob_no", "prob_yes"]].to_numpy(), expected[["prob_no", "prob_yes"]].to_numpy(), rtol=1e-5, atol=1e-6
        )
        assert server.poll() is None, "the server died"
    finally:
        server.terminate()
        server.wait(timeout=30)
    reliability.bad_input(
        "HTTP requests to `kd serve` with a missing, empty or wrong Content-Type (other types, charsets, parameters, random text)",
        tally.summary() + "; server alive and answering like the in-process model afterwards",
    )
