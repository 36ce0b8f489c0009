"""Ingestion, decoding, preprocessing and splits (pipelines/data.py), on the real yes/no set and small
synthetic cases written to tmp.

The real set (../shared/data/brain-mri-yes-no) is decoded once per session (``real_decoded``); every other
test either only ingests it (hashing, no decoding) or works on a few copied files / generated images.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines import data
from pipelines.config import Config, PipelineError

README_COUNTS = {"yes": 155, "no": 98}  # from the data README
SUFFIX_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- helpers


def _config(data_dir: Path | str, cache_dir: Path, **changes) -> Config:
    return Config(data_dir=str(data_dir), cache_dir=str(cache_dir), **changes)


def _ingest(data_dir: Path | str, tmp_path: Path, **changes) -> data.Dataset:
    return data.ingest(_config(data_dir, tmp_path / "cache", **changes))


def _ellipse(height: int, width: int, canvas: tuple[int, int] | None = None) -> np.ndarray:
    """A textured bright ellipse (the 'head', values ~110..190) on a zero background, uint8."""
    rows, cols = canvas or (height, width)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    inside = ((yy - cy) / (height / 2)) ** 2 + ((xx - cx) / (width / 2)) ** 2 <= 1.0
    texture = 150 + 40 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    return np.where(inside, np.round(texture), 0).astype(np.uint8)


def _write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def _tiny_folder(root: Path, counts: dict[str, int], size: int = 40) -> Path:
    """A folder per class of small, distinct, decodable PNGs (names with spaces)."""
    for c, (label, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            image = _ellipse(size - 8 - (i % 5), size - 10, canvas=(size, size))
            image = np.where(image > 0, image // 2 + 10 * c + i, 0).astype(np.uint8)
            _write_png(root / label / f"{label} scan {i}.png", image)
    return root


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)  # copyfile, not copy: the shared originals are read-only
    return dst


def _real_files(real_data_dir: Path, label: str, n: int, offset: int = 0) -> list[Path]:
    """n real files of a class, names with spaces first."""
    files = sorted((real_data_dir / label).iterdir(), key=lambda p: (" " not in p.name, p.name))
    return files[offset : offset + n]


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def _zscore(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    return (array - array.mean()) / array.std()


def _parts(splits: data.Splits) -> dict[str, np.ndarray]:
    return {"test": splits.test, **{f"fold_{k}": val for k, (_, val) in enumerate(splits.folds)}}


def _assert_partition_and_groups(dataset: data.Dataset, splits: data.Splits) -> None:
    """test + every fold's validation part cover each row exactly once; no group in two parts."""
    parts = _parts(splits)
    everything = np.concatenate(list(parts.values()))
    assert np.array_equal(np.sort(everything), np.arange(len(dataset.manifest)))
    rest = np.setdiff1d(np.arange(len(dataset.manifest)), splits.test)
    for train, val in splits.folds:
        assert np.intersect1d(train, val).size == 0
        assert np.array_equal(np.sort(np.concatenate([train, val])), rest)
    groups = dataset.manifest["group"].to_numpy()
    owner: dict[str, str] = {}
    for name, rows in parts.items():
        for group in set(groups[rows]):
            assert group not in owner, f"group {group!r} is in both {owner[group]} and {name}"
            owner[group] = name


# ------------------------------------------------------------------------------------- real-set fixtures


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture(scope="session")
def real_dataset(real_data_dir: Path, real_cache_dir: Path) -> data.Dataset:
    return data.ingest(_config(real_data_dir, real_cache_dir))


@pytest.fixture(scope="session")
def real_decoded(real_dataset: data.Dataset, real_cache_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The one decode of all real images (load_images at 32 px), recording each raw decode's properties."""
    raw: dict[str, tuple] = {}
    original = data.decode_image

    def recording(path, modality=None):
        image = original(path, modality)
        raw[str(path)] = (image.shape, image.dtype, bool(np.all(np.isfinite(image))), float(image.std()))
        return image

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "decode_image", recording)
        images = data.load_images(real_dataset, 32, real_cache_dir)
    return images, raw


@pytest.fixture(scope="module")
def real_splits(real_dataset: data.Dataset) -> data.Splits:
    return data.make_splits(real_dataset, folds=5, test_fraction=0.2, seed=42)


# ------------------------------------------------------------------------------------ 1. real set ingest


def test_real_set_ingest(real_dataset: data.Dataset, real_data_dir: Path) -> None:
    manifest = real_dataset.manifest
    assert len(manifest) == sum(README_COUNTS.values()) == 253
    assert manifest["label"].value_counts().to_dict() == README_COUNTS
    assert real_dataset.positive_class == "yes"
    assert real_dataset.class_names == ["no", "yes"]
    assert real_dataset.source == "folder"
    assert real_dataset.modality is None
    assert real_dataset.binary
    assert int(real_dataset.labels.sum()) == README_COUNTS["yes"]  # index 1 is the positive class
    assert list(manifest["path"]) == sorted(manifest["path"])
    assert set(manifest["given_split"]) == {""}
    # no patient ids: each image is its own group, except that identical files share one
    assert (manifest.groupby("sha256")["group"].nunique() == 1).all()
    assert manifest["group"].nunique() == manifest["sha256"].nunique() < len(manifest)
    on_disk = {str(p.resolve()) for p in real_data_dir.rglob("*") if p.is_file()}
    assert set(manifest["path"]) == on_disk
    assert manifest["path"].str.contains(" ").any()  # names with spaces are read too


def test_real_sha256_matches_file_contents(real_dataset: data.Dataset) -> None:
    for path, sha in real_dataset.manifest[["path", "sha256"]].itertuples(index=False):
        assert sha == hashlib.sha256(Path(path).read_bytes()).hexdigest(), path


def test_real_digest_is_stable(real_dataset: data.Dataset, real_data_dir: Path, tmp_path: Path) -> None:
    again = _ingest(real_data_dir, tmp_path)
    assert again.digest == real_dataset.digest
    pd.testing.assert_frame_equal(again.manifest, real_dataset.manifest)


@pytest.fixture
def small_copy(real_data_dir: Path, tmp_path: Path) -> Path:
    """4 yes + 4 no real images copied into tmp."""
    root = tmp_path / "small"
    for label in ("yes", "no"):
        for src in _real_files(real_data_dir, label, 4):
            _copy(src, root / label / src.name)
    return root


def _add_file(root: Path) -> None:
    src = sorted((root / "yes").iterdir())[0]
    _copy(src, root / "yes" / "an extra copy.jpg")


def _remove_file(root: Path) -> None:
    sorted((root / "no").iterdir())[0].unlink()


def _rename_file(root: Path) -> None:
    path = sorted((root / "no").iterdir())[0]
    path.rename(path.with_name("renamed " + path.name))


def _move_to_other_class(root: Path) -> None:
    path = sorted((root / "no").iterdir())[0]
    path.rename(root / "yes" / path.name)


def _edit_content(root: Path) -> None:
    path = sorted((root / "yes").iterdir())[0]
    path.write_bytes(path.read_bytes() + b"\0")


@pytest.mark.parametrize("change", [_add_file, _remove_file, _rename_file, _move_to_other_class, _edit_content])
def test_digest_changes_with_the_data(small_copy: Path, tmp_path: Path, change) -> None:
    before = _ingest(small_copy, tmp_path).digest
    change(small_copy)
    after = _ingest(small_copy, tmp_path)
    assert after.digest != before


def test_digest_ignores_location_and_restores_after_undo(small_copy: Path, tmp_path: Path) -> None:
    before = _ingest(small_copy, tmp_path).digest
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(small_copy, moved)
    assert _ingest(moved, tmp_path).digest == before  # the digest identifies the data, not where it lives
    _add_file(small_copy)
    added = _ingest(small_copy, tmp_path)
    assert added.digest != before and len(added.manifest) == 9
    (small_copy / "yes" / "an extra copy.jpg").unlink()
    assert _ingest(small_copy, tmp_path).digest == before


# ------------------------------------------------------------------------------------------- 2. decoding


def test_every_real_image_decodes(real_decoded, real_dataset: data.Dataset) -> None:
    images, raw = real_decoded
    assert images.shape == (253, 32, 32, 1)
    assert images.dtype == np.float32
    assert np.all(np.isfinite(images))
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), 0.0, atol=1e-3)
    np.testing.assert_allclose(images.std(axis=(1, 2, 3)), 1.0, atol=1e-3)
    # every file went through decode_image once, to a finite 2-D float image of the header's size
    assert set(raw) == set(real_dataset.manifest["path"])
    for path, (shape, dtype, finite, std) in raw.items():
        with Image.open(path) as image:
            assert shape == (image.height, image.width), path
        assert dtype == np.float32 and finite and std > 0, path


def test_real_files_with_lying_extensions_decode(real_dataset: data.Dataset) -> None:
    liars = []
    for path in map(Path, real_dataset.manifest["path"]):
        with Image.open(path) as image:
            actual = image.format
        if actual != SUFFIX_FORMAT[path.suffix.lower()]:
            liars.append(path)
    # An independent check of the same thing: the file signature against the suffix.
    by_signature = [
        path
        for path in map(Path, real_dataset.manifest["path"])
        if path.read_bytes()[:8].startswith(PNG_SIGNATURE) != (path.suffix.lower() == ".png")
    ]
    assert liars and sorted(liars) == sorted(by_signature)
    assert all(p.suffix.lower() in (".jpg", ".jpeg") for p in liars)  # PNGs named .jpg
    for path in liars:
        image = data.decode_image(path)
        with Image.open(path) as header:
            assert image.shape == (header.height, header.width)
        assert image.dtype == np.float32 and np.all(np.isfinite(image)) and image.std() > 0


def _mode_files(folder: Path) -> tuple[np.ndarray, dict[str, tuple[Path, str]]]:
    """The same picture saved in several modes / formats / extension spellings."""
    folder.mkdir(parents=True, exist_ok=True)
    base = _ellipse(40, 30, canvas=(48, 40))
    inside = base > 0
    files: dict[str, tuple[Path, str]] = {}

    path = folder / "gray L.PNG"
    Image.fromarray(base).save(path, format="PNG")
    files["L"] = (path, "L")

    path = folder / "colour rgb.Png"
    Image.fromarray(np.stack([base] * 3, axis=-1)).save(path, format="PNG")
    files["RGB"] = (path, "RGB")

    # transparent background whose colour is white: it must come out black, not white
    rgba = np.zeros(base.shape + (4,), np.uint8)
    rgba[..., :3] = np.where(inside, base, 255)[..., None]
    rgba[..., 3] = np.where(inside, 255, 0)
    path = folder / "with alpha.png"
    Image.fromarray(rgba).save(path, format="PNG")
    files["RGBA"] = (path, "RGBA")

    # palette: index i is grey i, index 255 is white and transparent (the background)
    indices = np.where(inside, base, 255).astype(np.uint8)
    palette_image = Image.frombytes("P", (base.shape[1], base.shape[0]), indices.tobytes())
    palette_image.putpalette([v for i in range(255) for v in (i, i, i)] + [255, 255, 255])
    path = folder / "palette.png"
    palette_image.save(path, format="PNG", transparency=255)
    files["P"] = (path, "P")

    path = folder / "sixteen bit.png"
    Image.fromarray(base.astype(np.uint16) * 257).save(path, format="PNG")
    files["I;16"] = (path, "I;16")

    path = folder / "png inside.jpg"
    Image.fromarray(base).save(path, format="PNG")
    files["PNG named .jpg"] = (path, "L")

    path = folder / "lossy scan.JPEG"
    Image.fromarray(base).save(path, format="JPEG", quality=95)
    files["JPEG"] = (path, "L")
    return base, files


MODE_CASES = ["L", "RGB", "RGBA", "P", "I;16", "PNG named .jpg", "JPEG"]


@pytest.fixture(scope="module")
def mode_files(tmp_path_factory: pytest.TempPathFactory):
    return _mode_files(tmp_path_factory.mktemp("modes") / "yes")


@pytest.mark.parametrize("case", MODE_CASES)
def test_decode_same_picture_in_every_mode(mode_files, case: str) -> None:
    base, files = mode_files
    path, mode = files[case]
    with Image.open(path) as image:  # the file really is what the case says
        assert image.mode == mode or (mode == "I;16" and image.mode in ("I", "I;16"))
        if mode == "P":
            assert "transparency" in image.info
    decoded = data.decode_image(path)
    assert decoded.shape == base.shape and decoded.dtype == np.float32
    if case == "JPEG":
        assert np.abs(decoded - base).mean() < 2.0
    elif case == "I;16":
        # full 16-bit range kept; same picture up to the intensity scale preprocess normalises away
        assert decoded.max() > 255
        np.testing.assert_allclose(_zscore(decoded), _zscore(base), atol=1e-3)
    else:
        assert np.abs(decoded - base.astype(np.float32)).max() <= 1.0
    expected = data.preprocess(base.astype(np.float32), 32)
    got = data.preprocess(decoded, 32)
    assert np.abs(got - expected).mean() < (0.05 if case == "JPEG" else 1e-3)


def test_decode_bytes_matches_decode_image(mode_files) -> None:
    _, files = mode_files
    path = files["RGBA"][0]
    np.testing.assert_array_equal(data.decode_bytes(path.read_bytes()), data.decode_image(path))


def test_ingest_finds_every_extension_spelling_and_skips_hidden(mode_files, tmp_path: Path) -> None:
    _, files = mode_files
    root = tmp_path / "set"
    for path, _ in files.values():
        _copy(path, root / "yes" / path.name)
    _tiny_folder(root, {"no": 2})
    (root / "yes" / ".DS_Store").write_bytes(b"junk")
    _write_png(root / "yes" / "._resource fork.jpg", _ellipse(8, 8))
    (root / "yes" / "notes.txt").write_text("not an image")
    dataset = _ingest(root, tmp_path)
    names = {Path(p).name for p in dataset.manifest.loc[dataset.manifest["label"] == "yes", "path"]}
    assert names == {path.name for path, _ in files.values()}


# ------------------------------------------------------------------------------------- 3. preprocessing


def test_crop_to_head_removes_border_and_ignores_annotations() -> None:
    rng = np.random.default_rng(0)
    canvas = rng.uniform(0, 4, size=(300, 320))  # dark, slightly noisy background
    head = _ellipse(60, 50).astype(np.float64)
    canvas[100:160, 140:190] = np.maximum(canvas[100:160, 140:190], head)
    # scanner annotations: isolated bright pixels in a corner and a short run of 'text'
    canvas[5, 5] = canvas[5, 9] = canvas[9, 7] = canvas[12, 3] = 255
    canvas[290, 300:304] = 255
    cropped = data.crop_to_head(canvas)
    assert abs(cropped.shape[0] - 60) <= 3 and abs(cropped.shape[1] - 50) <= 3
    assert cropped.max() < 255  # the annotations are outside the box
    assert (cropped > 50).sum() >= 0.98 * (head > 50).sum()  # the whole head is inside


def test_crop_to_head_leaves_flat_image_alone() -> None:
    flat = np.full((20, 30), 7.0)
    assert data.crop_to_head(flat).shape == (20, 30)


def test_preprocess_ignores_margins() -> None:
    head = _ellipse(60, 50).astype(np.float32)
    canvas = np.zeros((300, 320), np.float32)
    canvas[30:90, 200:250] = head
    np.testing.assert_allclose(data.preprocess(canvas, 32), data.preprocess(head, 32), atol=0.05)


@pytest.mark.parametrize("height, width", [(40, 120), (120, 40), (60, 90)])
def test_preprocess_keeps_aspect_ratio(height: int, width: int) -> None:
    size = 64
    canvas = np.zeros((400, 400), np.float32)
    top, left = (400 - height) // 2, (400 - width) // 2
    canvas[top : top + height, left : left + width] = _ellipse(height, width)
    out = data.preprocess(canvas, size)[..., 0]
    head = out > out.min() + 0.5 * (out.max() - out.min())
    rows, cols = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
    extent = {"rows": rows[-1] - rows[0] + 1, "cols": cols[-1] - cols[0] + 1}
    expected = {"rows": size * height / max(height, width), "cols": size * width / max(height, width)}
    for axis in ("rows", "cols"):
        assert abs(extent[axis] - expected[axis]) <= 3, (axis, extent, expected)
    # the short side is centred in the square
    short = rows if height < width else cols
    if height != width:
        assert abs(short[0] - (size - 1 - short[-1])) <= 2


@pytest.mark.parametrize("size", [32, 50, 64])
def test_preprocess_shape_and_normalisation(size: int) -> None:
    rng = np.random.default_rng(size)
    image = np.zeros((90, 130), np.float32)
    image[10:80, 20:110] = _ellipse(70, 90) * rng.uniform(0.5, 1.5)
    image += rng.normal(0, 1, image.shape).astype(np.float32)
    out = data.preprocess(image * 37.0 + 500.0, size)  # any intensity range
    assert out.shape == (size, size, 1) and out.dtype == np.float32
    assert abs(float(out.mean())) < 1e-3 and abs(float(out.std()) - 1.0) < 1e-3


def test_preprocess_constant_image_is_finite() -> None:
    out = data.preprocess(np.full((40, 40), 3.0, np.float32), 32)
    assert out.shape == (32, 32, 1) and np.all(np.isfinite(out))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_preprocess_rejects_non_finite(bad: float) -> None:
    image = _ellipse(40, 40).astype(np.float32)
    image[3, 4] = bad
    with pytest.raises(PipelineError, match="NaN or infinite"):
        data.preprocess(image, 32)


# ------------------------------------------------------------------------------------------------ 4. splits


def test_real_splits_partition_and_groups(real_dataset: data.Dataset, real_splits: data.Splits) -> None:
    assert len(real_splits.folds) == 5
    _assert_partition_and_groups(real_dataset, real_splits)
    assert 0.18 <= len(real_splits.test) / len(real_dataset.manifest) <= 0.22
    np.testing.assert_array_equal(real_splits.train, np.setdiff1d(np.arange(253), real_splits.test))


def test_real_splits_are_stratified(real_dataset: data.Dataset, real_splits: data.Splits) -> None:
    labels = real_dataset.labels
    overall = labels.mean()
    for name, rows in _parts(real_splits).items():
        assert abs(labels[rows].mean() - overall) < 0.05, (name, labels[rows].mean(), overall)
    for train, _ in real_splits.folds:
        assert abs(labels[train].mean() - overall) < 0.05


def test_real_splits_deterministic_per_seed(real_dataset: data.Dataset, real_splits: data.Splits) -> None:
    same = data.make_splits(real_dataset, folds=5, test_fraction=0.2, seed=42)
    np.testing.assert_array_equal(same.test, real_splits.test)
    for (a_train, a_val), (b_train, b_val) in zip(same.folds, real_splits.folds):
        np.testing.assert_array_equal(a_train, b_train)
        np.testing.assert_array_equal(a_val, b_val)
    other = data.make_splits(real_dataset, folds=5, test_fraction=0.2, seed=7)
    assert not np.array_equal(other.test, real_splits.test)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(other.folds, real_splits.folds))


def test_splits_table_labels(real_dataset: data.Dataset, real_splits: data.Splits) -> None:
    table = real_splits.table(real_dataset)
    assert list(table.columns) == ["path", "label", "group", "sha256", "split"]
    assert list(table["path"]) == list(real_dataset.manifest["path"])
    expected = pd.Series("", index=table.index, dtype=object)
    for name, rows in _parts(real_splits).items():
        expected.iloc[rows] = name
    assert (table["split"] == expected).all()
    assert set(table["split"]) == {"test", *(f"fold_{k}" for k in range(5))}


def _grouped_csv(root: Path) -> Path:
    """14 'patients' with 1-3 slices each, slices of both classes in some patients."""
    lines = ["path,label,group"]
    for patient in range(14):
        for k in range(1 + patient % 3):
            label = "tumor" if (patient + k) % 2 == 0 else "normal"
            relative = f"scans/patient {patient} slice {k}.png"
            _write_png(root / relative, np.full((8, 8), 10 * patient + k, np.uint8))
            lines.append(f"{relative},{label},patient-{patient}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_csv_digest_follows_grouping_not_row_order(tmp_path: Path) -> None:
    manifest = _grouped_csv(tmp_path / "grouped")
    before = _ingest(manifest, tmp_path).digest
    header, *rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join([header, *reversed(rows)]) + "\n")
    assert _ingest(manifest, tmp_path).digest == before  # rows are sorted by path
    regrouped = [rows[0].rsplit(",", 1)[0] + ",patient-new", *rows[1:]]
    manifest.write_text("\n".join([header, *regrouped]) + "\n")
    assert _ingest(manifest, tmp_path).digest != before  # other groups, other splits: other data


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_groups_never_straddle_parts(tmp_path: Path, seed: int) -> None:
    dataset = _ingest(_grouped_csv(tmp_path / "grouped"), tmp_path)
    assert dataset.source == "csv"
    assert dataset.manifest["group"].nunique() == 14 and len(dataset.manifest) > 14
    splits = data.make_splits(dataset, folds=3, test_fraction=0.2, seed=seed)
    _assert_partition_and_groups(dataset, splits)


# ---------------------------------------------------------------------------------------------- 5. layouts


@pytest.mark.parametrize("train_name, test_name", [("Training", "Testing"), ("train", "test")])
def test_split_layout_uses_given_test_split(real_data_dir: Path, tmp_path: Path, train_name: str, test_name: str) -> None:
    root = tmp_path / "split"
    testing = []
    for label in ("yes", "no"):
        files = _real_files(real_data_dir, label, 5)
        for src in files[:3]:
            _copy(src, root / train_name / label / src.name)
        for src in files[3:]:
            testing.append(_copy(src, root / test_name / label / src.name).resolve())
    dataset = _ingest(root, tmp_path)
    assert dataset.source == "folder-split"
    assert dataset.class_names == ["no", "yes"] and len(dataset.manifest) == 10
    assert any(" " in Path(p).name for p in dataset.manifest["path"])
    for fraction in (0.2, 0.4):  # the data's own test split wins over test_fraction
        splits = data.make_splits(dataset, folds=2, test_fraction=fraction, seed=0)
        assert {Path(p) for p in dataset.manifest["path"].iloc[splits.test]} == set(testing)
        _assert_partition_and_groups(dataset, splits)


def test_split_layout_needs_both_halves(real_data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "split"
    for label in ("yes", "no"):
        for src in _real_files(real_data_dir, label, 2):
            _copy(src, root / "Training" / label / src.name)
    with pytest.raises(PipelineError, match="Testing"):
        _ingest(root, tmp_path)


def test_csv_manifest_relative_paths(tmp_path: Path) -> None:
    root = tmp_path / "csv set"
    _tiny_folder(root / "images", {"yes": 3, "no": 3})
    rows = [f"images/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted((root / "images").rglob("*.png"))]
    (root / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    dataset = _ingest(root / "list.csv", tmp_path)
    assert dataset.source == "csv"
    assert dataset.class_names == ["no", "yes"] and dataset.positive_class == "yes"
    expected = {str((root / "images" / r.split(",")[0].split("/", 1)[1]).resolve()) for r in rows}
    assert set(dataset.manifest["path"]) == expected
    for path, label in dataset.manifest[["path", "label"]].itertuples(index=False):
        assert Path(path).parent.name == label
    # without a group column, the group is the image content, as for folders
    assert (dataset.manifest["group"] == "sha256:" + dataset.manifest["sha256"]).all()


@pytest.mark.parametrize("outside", ["../x.png", "ABSOLUTE"])
def test_csv_path_outside_folder_is_refused(tmp_path: Path, outside: str) -> None:
    _write_png(tmp_path / "x.png", _ellipse(10, 10))
    root = tmp_path / "sub"
    _tiny_folder(root, {"yes": 1})
    outside = str(tmp_path / "x.png") if outside == "ABSOLUTE" else outside
    (root / "manifest.csv").write_text(f"path,label\nyes/yes scan 0.png,yes\n{outside},no\n")
    with pytest.raises(PipelineError) as error:
        _ingest(root / "manifest.csv", tmp_path)
    assert "manifest.csv:3" in str(error.value) and outside in str(error.value) and "outside" in str(error.value)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("file,label\na.png,yes\n", "'path'"),
        ("path,diagnosis\na.png,yes\n", "'label'"),
        ("path,label\nmissing scan.png,yes\n", "manifest.csv:2"),
        ("path,label\nyes/yes scan 0.png,\n", "empty label"),
    ],
)
def test_csv_manifest_errors(tmp_path: Path, text: str, needle: str) -> None:
    _tiny_folder(tmp_path, {"yes": 1})
    (tmp_path / "manifest.csv").write_text(text)
    with pytest.raises(PipelineError, match=needle):
        _ingest(tmp_path / "manifest.csv", tmp_path)


def _write_brats(root: Path, volumes=range(1, 7), slices=3, tumour_slice=1, with_mask=True) -> dict[Path, np.ndarray]:
    h5py = pytest.importorskip("h5py")
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = {}
    for volume in volumes:
        for index in range(slices):
            image = (rng.random((24, 24, 4)) + np.arange(4) * 10).astype(np.float32)
            mask = np.zeros((24, 24, 3), np.uint8)
            if index == tumour_slice:
                mask[10:14, 8:12, 1] = 1
            path = root / f"volume_{volume}_slice_{index}.h5"
            with h5py.File(path, "w") as handle:
                handle["image"] = image
                if with_mask:
                    handle["mask"] = mask
            images[path.resolve()] = image
    return images


def test_brats_ingest(tmp_path: Path) -> None:
    images = _write_brats(tmp_path / "brats")
    dataset = _ingest(tmp_path / "brats", tmp_path)
    assert dataset.source == "brats"
    assert dataset.class_names == ["normal", "tumor"] and dataset.positive_class == "tumor"
    assert set(map(Path, dataset.manifest["path"])) == set(images)
    for path, label, group in dataset.manifest[["path", "label", "group"]].itertuples(index=False):
        volume, index = data.BRATS_PATTERN.search(Path(path).name).groups()
        assert label == ("tumor" if index == "1" else "normal")
        assert group == f"volume_{volume}"
    splits = data.make_splits(dataset, folds=2, test_fraction=0.2, seed=0)
    _assert_partition_and_groups(dataset, splits)  # slices of one volume stay together
    loaded = data.load_images(dataset, 32, tmp_path / "cache")
    assert loaded.shape == (len(images), 32, 32, 1) and np.all(np.isfinite(loaded))


@pytest.mark.parametrize("modality, index", [("flair", 0), ("T1", 1), ("t1ce", 2), ("t2", 3), ("0", 0), ("3", 3)])
def test_brats_modality_by_name_and_index(tmp_path: Path, modality: str, index: int) -> None:
    images = _write_brats(tmp_path / "brats", volumes=[1, 2], slices=2)
    dataset = _ingest(tmp_path / "brats", tmp_path, modality=modality)
    assert dataset.modality == index
    for path, image in images.items():
        np.testing.assert_array_equal(data.decode_image(path, dataset.modality), image[..., index])


def test_brats_digest_depends_on_modality(tmp_path: Path) -> None:
    _write_brats(tmp_path / "brats", volumes=[1, 2], slices=2)
    digests = {_ingest(tmp_path / "brats", tmp_path, modality=m).digest for m in data.BRATS_MODALITIES}
    assert len(digests) == 4  # cached arrays of one channel are never reused for another


@pytest.mark.parametrize("modality", ["dwi", "4"])
def test_brats_unknown_modality(tmp_path: Path, modality: str) -> None:
    _write_brats(tmp_path / "brats", volumes=[1], slices=2)
    with pytest.raises(PipelineError, match="modality"):
        _ingest(tmp_path / "brats", tmp_path, modality=modality)


def test_brats_missing_mask_names_file_and_key(tmp_path: Path) -> None:
    _write_brats(tmp_path / "brats", volumes=[1, 2], slices=2)
    _write_brats(tmp_path / "brats" / "odd", volumes=[9], slices=1, with_mask=False)
    with pytest.raises(PipelineError) as error:
        _ingest(tmp_path / "brats", tmp_path)
    assert "volume_9_slice_0.h5" in str(error.value) and "'mask'" in str(error.value)


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel

    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def test_nifti_cases_are_axial_slices_labelled_by_their_segmentation_and_grouped_by_case(tmp_path: Path) -> None:
    from brats_cases import write_nifti_cases

    truth = write_nifti_cases(tmp_path / "nifti", cases=6, depth=4)
    dataset = _ingest(tmp_path / "nifti", tmp_path)
    assert dataset.source == "nifti" and dataset.modality == 0
    assert dataset.class_names == ["normal", "tumor"] and dataset.positive_class == "tumor"
    seen = set()
    for path, label, group in dataset.manifest[["path", "label", "group"]].itertuples(index=False):
        volume, z = data.NIFTI_SLICE.match(path).group("file", "z")
        assert Path(volume).name == f"{group}_flair.nii.gz"
        assert label == ("tumor" if truth[group][int(z)] else "normal")
        seen.add((group, int(z)))
    # the empty slices below and above each head are dropped, every other slice is a row
    assert seen == {(case, z) for case, tumour in truth.items() for z in range(1, len(tumour) - 1)}
    assert dataset.manifest["sha256"].is_unique
    splits = data.make_splits(dataset, folds=2, test_fraction=0.2, seed=0)
    _assert_partition_and_groups(dataset, splits)  # slices of one case stay together
    loaded = data.load_images(dataset, 32, tmp_path / "cache")
    assert loaded.shape == (len(dataset.manifest), 32, 32, 1) and np.all(np.isfinite(loaded))


def test_nifti_slices_are_read_in_ras_orientation_from_the_modality_file(tmp_path: Path) -> None:
    volume = np.arange(5 * 6 * 3, dtype=np.int16).reshape(5, 6, 3) + 1
    for index, name in enumerate(data.BRATS_MODALITIES):
        _nifti(tmp_path / "set" / "c1" / f"c1_{name}.nii", volume * (index + 1), np.diag([-1.0, -1.0, 1.0, 1.0]))
        _nifti(tmp_path / "set" / "c2" / f"c2_{name}.nii", volume * (index + 1), np.diag([-1.0, -1.0, 1.0, 1.0]))
    for case in ("c1", "c2"):
        seg = np.zeros((5, 6, 3), np.uint8)
        seg[0, 0, 1 if case == "c1" else 2] = 4
        _nifti(tmp_path / "set" / case / f"{case}_seg.nii", seg, np.diag([-1.0, -1.0, 1.0, 1.0]))
    flair, t2 = _ingest(tmp_path / "set", tmp_path), _ingest(tmp_path / "set", tmp_path, modality="t2")
    assert flair.digest != t2.digest and all("_t2.nii#z=" in p for p in t2.manifest["path"])
    for path in t2.manifest["path"]:
        z = int(data.NIFTI_SLICE.match(path)["z"])
        # stored left-right and front-back flipped (as BraTS is): RAS reverses both axes
        np.testing.assert_array_equal(data.decode_image(path), (volume * 4)[::-1, ::-1, z])
    assert list(t2.manifest["label"]) == ["normal", "tumor", "normal", "normal", "normal", "tumor"]


def test_nifti_slice_selection_keeps_slices_with_a_quarter_of_the_largest_brain_area(tmp_path: Path) -> None:
    volume = np.zeros((10, 10, 6), np.float32)
    for z, side in enumerate([0, 4, 5, 10, 6, 1]):  # brain areas 0, 16, 25, 100, 36, 1 voxels
        volume[:side, :side, z] = 50 + z
    for case in ("a", "b"):
        _nifti(tmp_path / "set" / case / f"{case}_flair.nii.gz", volume)
        _nifti(tmp_path / "set" / case / f"{case}_seg.nii.gz", ((volume > 0) * (case == "a")).astype(np.uint8))
    dataset = _ingest(tmp_path / "set", tmp_path)
    kept = {int(data.NIFTI_SLICE.match(p)["z"]) for p in dataset.manifest["path"]}
    assert kept == {2, 3, 4}  # areas >= 25 = a quarter of 100


def test_request_bytes_decode_to_the_same_pixels_as_the_manifest_row(tmp_path: Path) -> None:
    from brats_cases import write_h5_slices, write_nifti_cases

    write_nifti_cases(tmp_path / "nifti", cases=2, depth=2)
    write_h5_slices(tmp_path / "h5", volumes=2, slices=1)
    png = _write_png(tmp_path / "scan.png", _ellipse(20, 30))
    rows = [(p, 0) for p in _ingest(tmp_path / "nifti", tmp_path).manifest["path"]]
    rows += [(p, 2) for p in _ingest(tmp_path / "h5", tmp_path, modality="t1ce").manifest["path"]] + [(str(png), None)]
    for path, modality in rows:
        payload = data.request_bytes(path)
        np.testing.assert_array_equal(data.decode_bytes(payload, "row", modality), data.decode_image(path, modality))
        if Path(path).is_file():
            assert payload == Path(path).read_bytes()  # files travel as they are
        else:
            assert payload[:2] == data.GZIP_MAGIC and data.decode_bytes(payload, "row").ndim == 2


@pytest.mark.parametrize("remove, needle", [("seg", "Case_001_seg.nii.gz"), ("flair", "Case_001_flair.nii.gz")])
def test_a_nifti_case_without_its_segmentation_or_modality_is_named(tmp_path: Path, remove: str, needle: str) -> None:
    from brats_cases import write_nifti_cases

    write_nifti_cases(tmp_path / "nifti", cases=2, depth=2)
    (tmp_path / "nifti" / "Case_001" / f"Case_001_{remove}.nii.gz").unlink()
    with pytest.raises(PipelineError, match=needle):
        _ingest(tmp_path / "nifti", tmp_path)


def test_a_nifti_segmentation_of_another_shape_is_named(tmp_path: Path) -> None:
    from brats_cases import write_nifti_cases

    write_nifti_cases(tmp_path / "nifti", cases=2, depth=2)
    _nifti(tmp_path / "nifti" / "Case_000" / "Case_000_seg.nii.gz", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(PipelineError, match="Case_000_seg.nii.gz: shape"):
        _ingest(tmp_path / "nifti", tmp_path)


# ------------------------------------------------------------------------------------------ 6. bad input


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no such folder here"):
        _ingest(tmp_path / "no such folder here", tmp_path)


def test_data_dir_file_not_csv(tmp_path: Path) -> None:
    (tmp_path / "scans.zip").write_bytes(b"PK")
    with pytest.raises(PipelineError, match="scans.zip"):
        _ingest(tmp_path / "scans.zip", tmp_path)


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    _write_png(tmp_path / "flat" / "a.png", _ellipse(10, 10))
    with pytest.raises(PipelineError, match="no class folders"):
        _ingest(tmp_path / "flat", tmp_path)


def test_empty_class_folder(tmp_path: Path) -> None:
    root = _tiny_folder(tmp_path / "set", {"yes": 2})
    (root / "no").mkdir()
    (root / "no" / ".DS_Store").write_bytes(b"junk")
    (root / "no" / "readme.txt").write_text("nothing here")
    with pytest.raises(PipelineError) as error:
        _ingest(root, tmp_path)
    assert str(root / "no") in str(error.value) and "no images" in str(error.value)


def test_one_class_only(tmp_path: Path) -> None:
    root = _tiny_folder(tmp_path / "set", {"yes": 3})
    with pytest.raises(PipelineError, match=r"only one class \(\['yes'\]\)"):
        _ingest(root, tmp_path)


def test_too_few_per_class_for_folds_real(real_dataset: data.Dataset) -> None:
    with pytest.raises(PipelineError) as error:
        data.make_splits(real_dataset, folds=100, test_fraction=0.2, seed=42)
    assert "folds=100" in str(error.value) and "'no'" in str(error.value)


def test_too_few_per_class_for_hold_out(tmp_path: Path) -> None:
    dataset = _ingest(_tiny_folder(tmp_path / "set", {"yes": 6, "no": 3}), tmp_path)
    with pytest.raises(PipelineError) as error:
        data.make_splits(dataset, folds=2, test_fraction=0.2, seed=0)
    assert "'no'" in str(error.value) and "hold-out" in str(error.value)


def test_too_few_groups_counts_groups_not_images(tmp_path: Path) -> None:
    """10 'no' images but only 2 patients: not enough for 3 folds."""
    lines = ["path,label,group"]
    for i in range(12):
        _write_png(tmp_path / f"y{i}.png", np.full((8, 8), i, np.uint8))
        lines.append(f"y{i}.png,yes,py{i}")
    for i in range(10):
        _write_png(tmp_path / f"n{i}.png", np.full((8, 8), 100 + i, np.uint8))
        lines.append(f"n{i}.png,no,pn{i % 2}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    dataset = _ingest(tmp_path / "manifest.csv", tmp_path)
    with pytest.raises(PipelineError, match=r"class 'no' has 2 image group\(s\)"):
        data.make_splits(dataset, folds=3, test_fraction=0.2, seed=0)


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _truncated_jpeg(path: Path) -> None:
    noise = np.random.default_rng(2).integers(0, 256, (256, 256), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="JPEG", quality=90)
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])


def _truncated_png(path: Path) -> None:
    noise = np.random.default_rng(3).integers(0, 256, (128, 128), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="PNG")
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])


def _text(path: Path) -> None:
    path.write_text("this is not an image\n")


@pytest.mark.parametrize("make", [_random_bytes, _empty, _truncated_jpeg, _truncated_png, _text])
def test_undecodable_file_is_named(tmp_path: Path, make) -> None:
    path = tmp_path / "broken scan.jpg"
    make(path)
    with pytest.raises(PipelineError, match="cannot decode") as error:
        data.decode_image(path)
    assert str(path) in str(error.value)


def test_load_images_names_the_bad_file(tmp_path: Path) -> None:
    root = _tiny_folder(tmp_path / "set", {"yes": 3, "no": 3})
    _truncated_jpeg(root / "yes" / "cut off.jpg")
    dataset = _ingest(root, tmp_path)
    with pytest.raises(PipelineError, match="cut off.jpg"):
        data.load_images(dataset, 32, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing half-done is cached


def test_decompression_bomb_guard_before_decoding(tmp_path: Path) -> None:
    side = int(np.sqrt(data.MAX_PIXELS)) + 100  # just over the guard, under Pillow's own limit
    path = _png_header_only(tmp_path / "huge.png", side, side)
    with pytest.raises(PipelineError) as error:
        data.decode_image(path)
    assert f"{side}x{side}" in str(error.value) and str(path) in str(error.value)


def test_decompression_bomb_far_over_pillow_limit(tmp_path: Path) -> None:
    path = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(PipelineError, match="bomb.png"):
        data.decode_image(path)


def test_max_pixels_boundary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_png(tmp_path / "small.png", _ellipse(20, 30, canvas=(20, 30)))
    monkeypatch.setattr(data, "MAX_PIXELS", 600)  # exactly the image: allowed
    assert data.decode_image(path).shape == (20, 30)
    monkeypatch.setattr(data, "MAX_PIXELS", 599)
    with pytest.raises(PipelineError, match="30x20 exceeds 599"):
        data.decode_image(path)


@pytest.mark.parametrize(
    "classes, requested, positive",
    [
        (["no", "yes"], "", "yes"),
        (["normal", "tumor"], "", "tumor"),
        (["no_tumor", "tumor"], "", "tumor"),
        (["glioma", "no_tumor"], "", "glioma"),
        (["No", "Yes"], "", "Yes"),
        (["no", "yes"], "no", "no"),
    ],
)
def test_detect_positive_class(classes: list[str], requested: str, positive: str) -> None:
    assert data.detect_positive_class(classes, requested) == positive


@pytest.mark.parametrize("classes, requested", [(["cat", "dog"], ""), (["no", "yes"], "maybe")])
def test_detect_positive_class_errors(classes: list[str], requested: str) -> None:
    with pytest.raises(PipelineError, match="positive_class"):
        data.detect_positive_class(classes, requested)


def test_explicit_positive_class_reorders_labels(tmp_path: Path) -> None:
    root = _tiny_folder(tmp_path / "set", {"yes": 2, "no": 3})
    dataset = _ingest(root, tmp_path, positive_class="no")
    assert dataset.class_names == ["yes", "no"] and dataset.positive_class == "no"
    assert list(dataset.labels) == [int(label == "no") for label in dataset.manifest["label"]]
    with pytest.raises(PipelineError, match="positive_class='maybe'"):
        _ingest(root, tmp_path, positive_class="maybe")


def test_three_classes(tmp_path: Path) -> None:
    root = _tiny_folder(tmp_path / "set", {"glioma": 2, "meningioma": 2, "no_tumor": 2})
    dataset = _ingest(root, tmp_path)
    assert dataset.class_names == ["glioma", "meningioma", "no_tumor"]
    assert dataset.positive_class is None and not dataset.binary
    with pytest.raises(PipelineError, match="only applies to two classes"):
        _ingest(root, tmp_path, positive_class="glioma")


# ------------------------------------------------------------------------------------------------ 7. cache


def test_load_images_reuses_cache(real_decoded, real_dataset: data.Dataset, real_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, _ = real_decoded

    def refuse(*args, **kwargs):
        raise AssertionError("decode_image called although the arrays are cached")

    monkeypatch.setattr(data, "decode_image", refuse)
    again = data.load_images(real_dataset, 32, real_cache_dir)
    np.testing.assert_array_equal(again, images)
    cached = sorted((real_cache_dir / "arrays").iterdir())
    assert len(cached) == 1  # no temporary files left behind
    assert real_dataset.digest[:16] in cached[0].name and "32px" in cached[0].name


def test_cache_keyed_by_size_and_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tiny_folder(tmp_path / "set", {"yes": 3, "no": 3})
    cache = tmp_path / "cache"
    calls = []
    original = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda path, modality=None: calls.append(path) or original(path, modality))

    dataset = _ingest(root, tmp_path)
    first = data.load_images(dataset, 32, cache)
    assert len(calls) == 6
    assert data.load_images(dataset, 32, cache).shape == first.shape and len(calls) == 6
    assert data.load_images(dataset, 40, cache).shape == (6, 40, 40, 1) and len(calls) == 12
    # same file names, new content: a new digest, so the old arrays are not reused
    target = sorted((root / "yes").iterdir())[0]
    _write_png(target, np.zeros((40, 40), np.uint8) + np.arange(40, dtype=np.uint8)[None, :] * 5)
    changed = _ingest(root, tmp_path)
    assert changed.digest != dataset.digest
    fresh = data.load_images(changed, 32, cache)
    assert len(calls) == 18
    row = list(changed.manifest["path"]).index(str(target.resolve()))
    np.testing.assert_allclose(fresh[row], data.preprocess(original(target), 32))
    names = sorted(p.name for p in (cache / "arrays").iterdir())
    assert len(names) == 3 and all(n.endswith(".npy") and ".tmp" not in n for n in names)


# ------------------------------------------------------------------------------------------ 6. duplicates


def _resaved(src: Path, dst: Path, scale: float = 1.0, fmt: str = "JPEG", **options) -> Path:
    """A copy of a scan as another file: re-encoded (JPEG quality ``options``) and/or rescaled by ``scale``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as image:
        image = image.convert("L")
        if scale != 1.0:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        image.save(dst, format=fmt, **options)
    return dst


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between two sets of perceptual hashes, plainly (no matrix tricks)."""
    return (a[:, None, :] != b[None, :, :]).sum(axis=2)


def test_the_perceptual_hash_matches_copies_of_a_scan_but_never_two_different_real_scans(
    real_decoded, real_dataset: data.Dataset, tmp_path: Path
) -> None:
    images, _ = real_decoded
    hashes = data.perceptual_hashes(images)
    assert hashes.shape == (253, 143) and hashes.dtype == bool
    distance = _distances(hashes, hashes)
    correlation = np.corrcoef(images.reshape(len(images), -1))
    sha = real_dataset.manifest["sha256"].to_numpy()
    pairs = np.triu_indices(len(images), 1)
    different_files = sha[pairs[0]] != sha[pairs[1]]
    # Different scans (not re-saved copies: the preprocessed images correlate below 0.9) are never matched ...
    different = different_files & (correlation[pairs] < 0.9)
    assert distance[pairs][different].min() > data.NEAR_DUPLICATE_BITS
    # ... and every match among different files is one scan saved twice (the real set holds such copies).
    matched = different_files & (distance[pairs] <= data.NEAR_DUPLICATE_BITS)
    assert matched.any() and correlation[pairs][matched].min() > 0.95
    print(
        f"\nreal set, {different.sum()} pairs of different scans: min distance {distance[pairs][different].min()}, "
        f"0.1th percentile {np.percentile(distance[pairs][different], 0.1):.0f}; {matched.sum()} re-saved pairs matched, max distance {distance[pairs][matched].max()}"
    )

    # JPEG re-encodes and slightly rescaled copies of real scans are matched to their originals.
    paths = real_dataset.manifest["path"].to_numpy()
    rows = np.linspace(0, len(paths) - 1, 12).astype(int)
    copies = {
        "jpeg q75": lambda src, dst: _resaved(src, dst, quality=75),
        "jpeg q50": lambda src, dst: _resaved(src, dst, quality=50),
        "0.9x png": lambda src, dst: _resaved(src, dst, 0.9, "PNG"),
        "1.1x jpeg q90": lambda src, dst: _resaved(src, dst, 1.1, quality=90),
    }
    for name, make in copies.items():
        copied = np.stack([data.preprocess(data.decode_image(make(Path(paths[r]), tmp_path / f"{name} {r}.img")), 32) for r in rows])
        to_original = np.diag(_distances(data.perceptual_hashes(copied), hashes[rows]))
        assert to_original.max() <= data.NEAR_DUPLICATE_BITS, (name, to_original)
        print(f"{name}: distances to the original {sorted(to_original.tolist())}")


def _leaky_split_set(real_data_dir: Path, root: Path) -> dict[str, set[str]]:
    """Training/ + Testing/ from real scans, Testing holding 2 byte-identical copies and 2 re-saved copies
    (JPEG re-encode, 0.9x rescale) of Training scans besides 4 scans of its own. Returns the copies' names."""
    for label in ("yes", "no"):
        files = _real_files(real_data_dir, label, 8, offset=20)
        for src in files[:6]:
            _copy(src, root / "Training" / label / src.name)
        for src in files[6:]:
            _copy(src, root / "Testing" / label / src.name)
    training = {label: sorted((root / "Training" / label).iterdir()) for label in ("yes", "no")}
    _copy(training["yes"][0], root / "Testing" / "yes" / "copy of yes 0.jpg")
    _copy(training["no"][1], root / "Testing" / "no" / "copy of no 1.jpg")
    _resaved(training["yes"][2], root / "Testing" / "yes" / "re-encoded yes 2.jpg", quality=60)
    _resaved(training["no"][3], root / "Testing" / "no" / "rescaled no 3.png", 0.9, "PNG")
    return {"identical": {"copy of yes 0.jpg", "copy of no 1.jpg"}, "near": {"re-encoded yes 2.jpg", "rescaled no 3.png"}}


def test_duplicates_across_a_given_split_are_dropped_from_the_holdout_logged_and_printed(
    real_data_dir: Path, tmp_path: Path, capsys
) -> None:
    import mlflow
    from kdtest import tracking_at

    from pipelines.prepare import prepare, prepare_data

    copies = _leaky_split_set(real_data_dir, tmp_path / "leaky")
    cfg = _config(tmp_path / "leaky", tmp_path / "cache", image_size=32, folds=2, experiment_name="dedupe")
    prepared = prepare_data(cfg)
    dataset, splits = prepared.dataset, prepared.splits
    assert (
        "prepare: 4 hold-out image(s) duplicate training images (2 identical, 2 near-identical within 16 hash bits): dropped from the hold-out, 4 left"
        in capsys.readouterr().out
    )
    names = dataset.manifest["path"].map(lambda p: Path(p).name).to_numpy()
    duplicates = splits.duplicates
    assert {kind: set(names[duplicates.index[duplicates["kind"] == kind]]) for kind in ("identical", "near")} == copies
    assert (duplicates.loc[duplicates["kind"] == "identical", "distance"] == 0).all()
    assert duplicates["distance"].between(0, data.NEAR_DUPLICATE_BITS).all()
    sha = dataset.manifest.set_index("path")["sha256"]
    identical = duplicates[duplicates["kind"] == "identical"]
    assert (sha[identical["test_path"]].to_numpy() == sha[identical["train_path"]].to_numpy()).all()
    given = dataset.manifest["given_split"].to_numpy()
    assert (given[dataset.manifest["path"].isin(duplicates["train_path"]).to_numpy()] == "train").all()

    # dropped rows are in no part: not the hold-out, not any fold
    np.testing.assert_array_equal(splits.dropped, duplicates.index.to_numpy())
    in_parts = np.concatenate([splits.test, *(np.concatenate(fold) for fold in splits.folds)])
    assert np.intersect1d(in_parts, splits.dropped).size == 0
    assert set(names[splits.test]).isdisjoint(copies["identical"] | copies["near"]) and len(splits.test) == 4
    table = splits.table(dataset)
    assert set(table.loc[table["split"] == "dropped", "path"]) == set(duplicates["test_path"])

    # the step logs the count as a metric and the list as an artifact
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        run = mlflow.get_run(prepare(cfg, prepared))
        assert run.data.metrics["holdout_duplicates"] == 4 and run.data.params["dedupe"] == "drop"
        logged = pd.read_csv(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="data/holdout_duplicates.csv", dst_path=str(tmp_path / "dl")
            )
        )
        splits_csv = pd.read_csv(
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data/splits.csv", dst_path=str(tmp_path / "dl"))
        )
    assert list(logged.columns) == ["test_path", "train_path", "kind", "distance"]
    pd.testing.assert_frame_equal(logged, duplicates.reset_index(drop=True))
    assert (splits_csv["split"] == "dropped").sum() == 4


def test_dedupe_keep_keeps_the_duplicates_in_the_holdout_and_error_refuses_the_data(real_data_dir: Path, tmp_path: Path, capsys) -> None:
    from pipelines.prepare import prepare_data

    _leaky_split_set(real_data_dir, tmp_path / "leaky")
    cfg = _config(tmp_path / "leaky", tmp_path / "cache", image_size=32, folds=2)
    kept = prepare_data(cfg.replace(dedupe="keep"))
    assert len(kept.splits.duplicates) == 4 and kept.splits.dropped.size == 0 and len(kept.splits.test) == 8
    assert "4 hold-out image(s) duplicate training images" in capsys.readouterr().out
    assert set(kept.splits.duplicates.index) <= set(kept.splits.test)  # the user's choice: the leak stays, and is on record
    with pytest.raises(
        PipelineError, match=r"4 hold-out image\(s\) duplicate training images \(2 identical, 2 near-identical.*dedupe=drop"
    ):
        prepare_data(cfg.replace(dedupe="error"))
    with pytest.raises(PipelineError, match="dedupe='maybe': use drop, keep, error"):
        cfg.replace(dedupe="maybe")


def test_without_a_given_split_near_duplicates_share_a_group_and_never_straddle_parts(real_data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "flat"
    original_of = {}
    for label in ("yes", "no"):
        for src in _real_files(real_data_dir, label, 10, offset=40):
            _copy(src, root / label / src.name)
        for k, src in enumerate(sorted((root / label).iterdir())[:3]):
            original_of[_resaved(src, root / label / f"re-encoded {k}.jpg", quality=60).resolve()] = src.resolve()
    dataset = _ingest(root, tmp_path)
    hashes = data.perceptual_hashes(data.load_images(dataset, 32, tmp_path / "cache"))
    merged = data.duplicate_groups(dataset, hashes)
    row_of = {Path(p): row for row, p in enumerate(dataset.manifest["path"])}
    copies = np.array([row_of[copy] for copy in original_of])
    assert all(merged[row_of[copy]] == merged[row_of[original]] for copy, original in original_of.items())
    originals = np.setdiff1d(np.arange(len(merged)), copies)
    assert set(merged) == set(merged[originals])  # a copy never starts a group of its own
    assert set(dataset.manifest["group"].to_numpy()[originals]) >= set(merged)  # groups are joined, never invented
    for seed in range(3):
        splits = data.make_splits(dataset, folds=2, test_fraction=0.25, seed=seed, hashes=hashes)
        assert splits.duplicates is None and splits.dropped.size == 0
        assert list(splits.table(dataset)["group"]) == list(merged)  # the logged table shows the groups split by
        part = {row: name for name, rows in _parts(splits).items() for row in rows}
        for copy, original in original_of.items():
            assert part[row_of[copy]] == part[row_of[original]], (seed, copy.name)
