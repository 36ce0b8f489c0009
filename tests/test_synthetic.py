"""The embedded synthetic MRI set: deterministic, well-formed, with a lesion really where lesions.csv says."""

from __future__ import annotations

import csv
import hashlib
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data import synthetic
from pipelines.data.synthetic import (
    NEGATIVE_CLASS,
    POSITIVE_CLASS,
    ensure_synthetic_dataset,
    generate_synthetic_mri,
    tumor_count,
)

SIZE = 64
N_IMAGES = 40
FRACTION = 0.6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated set shared by the read-only checks (generation is the slow part)."""
    return generate_synthetic_mri(tmp_path_factory.mktemp("synth") / "set", N_IMAGES, SIZE, FRACTION, seed=0)


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root, keyed by relative path."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "lesions.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _load(root: Path, relative: str) -> np.ndarray:
    return np.asarray(Image.open(root / relative), dtype=np.float64)


def _inside_minus_ring(image: np.ndarray, cx: float, cy: float, radius: float) -> float:
    """Mean intensity of the lesion's inner disc minus that of the surrounding ring (1.3 to 2 radii)."""
    ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    distance = np.hypot(xs - cx, ys - cy)
    inner = image[distance <= 0.6 * radius]
    ring = image[(distance >= 1.3 * radius) & (distance <= 2.0 * radius)]
    return float(inner.mean() - ring.mean())


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path: Path, dataset: Path) -> None:
    again = generate_synthetic_mri(tmp_path / "again", N_IMAGES, SIZE, FRACTION, seed=0)
    other = generate_synthetic_mri(tmp_path / "other", N_IMAGES, SIZE, FRACTION, seed=1)

    reference = _digests(dataset)
    assert len(reference) == N_IMAGES + 1  # every image plus lesions.csv
    assert _digests(again) == reference

    different = _digests(other)
    # The other seed draws other images (and shuffles the classes differently), so no image file
    # may coincide, not even one that happens to share a name.
    shared_names = reference.keys() & different.keys()
    assert all(reference[name] != different[name] for name in shared_names)
    assert set(reference.values()).isdisjoint(different.values())


def test_class_counts_follow_tumor_fraction(dataset: Path) -> None:
    tumours = sorted((dataset / POSITIVE_CLASS).glob("*.png"))
    normals = sorted((dataset / NEGATIVE_CLASS).glob("*.png"))
    assert len(tumours) == round(N_IMAGES * FRACTION) == 24
    assert len(normals) == N_IMAGES - 24
    # Names are numbered globally, so the two folders never share one.
    assert {p.name for p in tumours}.isdisjoint(p.name for p in normals)


def test_classes_are_shuffled_over_the_numbering(dataset: Path) -> None:
    # Tumours are not simply the first files: a loader that keeps file order still sees both classes mixed.
    tumour_indices = sorted(int(p.stem.split("_")[1]) for p in (dataset / POSITIVE_CLASS).glob("*.png"))
    assert tumour_indices != list(range(len(tumour_indices)))
    assert tumour_indices != list(range(N_IMAGES - len(tumour_indices), N_IMAGES))


@pytest.mark.parametrize(
    ("n_images", "fraction", "expected"),
    [(300, 0.6, 180), (5, 0.5, 3), (10, 0.25, 3), (2, 0.1, 1), (2, 0.9, 1), (20, 0.99, 19)],
)
def test_tumor_count_rounds_half_up_and_keeps_both_classes(n_images: int, fraction: float, expected: int) -> None:
    assert tumor_count(n_images, fraction) == expected


def test_every_image_is_grayscale_png_of_requested_size(dataset: Path) -> None:
    files = sorted(dataset.rglob("*.png"))
    assert len(files) == N_IMAGES
    for path in files:
        assert path.parent.name in (POSITIVE_CLASS, NEGATIVE_CLASS)
        assert path.name.startswith("synth_")
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.mode == "L"
            assert image.size == (SIZE, SIZE)


def test_lesions_csv_lists_exactly_the_tumour_images(dataset: Path) -> None:
    with open(dataset / "lesions.csv", newline="", encoding="utf-8") as handle:
        assert handle.readline().strip() == "file,label,cx,cy,radius"
    rows = _rows(dataset)
    on_disk = {p.relative_to(dataset).as_posix() for p in dataset.rglob("*.png")}
    assert {row["file"] for row in rows} == on_disk
    assert len(rows) == len(on_disk)

    for row in rows:
        assert row["file"].split("/")[0] == row["label"]
        if row["label"] == NEGATIVE_CLASS:
            assert row["cx"] == row["cy"] == row["radius"] == ""
            continue
        assert row["label"] == POSITIVE_CLASS
        cx, cy, radius = float(row["cx"]), float(row["cy"]), float(row["radius"])
        # Centre inside the image, radius within the documented 4-15 % of the image...
        assert 0 <= cx < SIZE and 0 <= cy < SIZE
        assert 0.04 * SIZE <= radius <= 0.15 * SIZE
        # ...and the whole lesion inside the frame, as it must be to lie inside the head.
        assert radius <= cx <= SIZE - radius and radius <= cy <= SIZE - radius


def test_lesion_is_visible_where_lesions_csv_says(dataset: Path) -> None:
    rows = _rows(dataset)
    tumours = [row for row in rows if row["label"] == POSITIVE_CLASS]
    normals = [row for row in rows if row["label"] == NEGATIVE_CLASS]

    contrasts = np.array(
        [_inside_minus_ring(_load(dataset, row["file"]), float(row["cx"]), float(row["cy"]), float(row["radius"])) for row in tumours]
    )
    # Control: the same circles laid over normal images. Anatomy (ventricles, cortex) alone gives
    # differences of either sign around zero; a real lesion makes the inside brighter.
    controls = np.array(
        [
            _inside_minus_ring(_load(dataset, normal["file"]), float(row["cx"]), float(row["cy"]), float(row["radius"]))
            for normal, row in zip(normals, tumours)
        ]
    )
    # Observed: tumour mean ~60-80 grey levels (every single one > 15), control mean ~0-12.
    assert contrasts.mean() > 30
    assert contrasts.mean() > controls.mean() + 25
    assert (contrasts > 0).mean() >= 0.9


def test_background_is_dark_and_head_brighter(dataset: Path) -> None:
    corner = max(2, SIZE // 16)
    for path in sorted(dataset.rglob("*.png")):
        image = _load(dataset, path.relative_to(dataset).as_posix())
        corners = np.concatenate([image[:corner, :corner], image[:corner, -corner:], image[-corner:, :corner], image[-corner:, -corner:]])
        centre = image[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4]
        assert corners.mean() < 25  # Rician noise floor only (observed ~10)
        assert centre.mean() > corners.mean() + 50  # observed ~90 grey levels brighter
        assert corners.max() < 80  # no anatomy reaches the corners


def test_ensure_generates_once_then_reuses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_root = tmp_path / "cache"
    first = ensure_synthetic_dataset(cache_root, n_images=20, image_size=SIZE, seed=3)

    assert first.parent == cache_root
    assert first.name.startswith("synthetic-v1-")
    assert len(list(first.rglob("*.png"))) == 20
    assert [p.name for p in cache_root.iterdir()] == [first.name]  # no temporary directory left
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*")}

    def must_not_run(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cached set was regenerated")

    monkeypatch.setattr(synthetic, "generate_synthetic_mri", must_not_run)
    second = ensure_synthetic_dataset(cache_root, n_images=20, image_size=SIZE, seed=3)

    assert second == first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamps
    assert [p.name for p in cache_root.iterdir()] == [first.name]


def test_ensure_publishes_by_renaming_the_staging_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The set is generated elsewhere and moved into place whole: never visible half-written."""
    real_generate = synthetic.generate_synthetic_mri
    staging: list[tuple[Path, int]] = []

    def generate_and_record(out_dir: Path, *args: object) -> Path:
        result = real_generate(out_dir, *args)
        assert not any(p.name.startswith("synthetic-") for p in tmp_path.iterdir())  # nothing published yet
        staging.append((out_dir, out_dir.stat().st_ino))
        return result

    monkeypatch.setattr(synthetic, "generate_synthetic_mri", generate_and_record)
    final = ensure_synthetic_dataset(tmp_path, n_images=20, image_size=SIZE, seed=8)

    [(staging_dir, staging_inode)] = staging
    assert staging_dir.parent == tmp_path and staging_dir != final
    # Same inode: the staging directory itself was renamed, not copied file by file.
    assert final.stat().st_ino == staging_inode
    assert not staging_dir.exists()


def test_ensure_keys_the_cache_by_parameters(tmp_path: Path) -> None:
    base = ensure_synthetic_dataset(tmp_path, n_images=20, image_size=SIZE, seed=3)
    other_seed = ensure_synthetic_dataset(tmp_path, n_images=20, image_size=SIZE, seed=4)
    other_size = ensure_synthetic_dataset(tmp_path, n_images=20, image_size=32, seed=3)
    assert len({base, other_seed, other_size}) == 3
    # The cached set is exactly what generate_synthetic_mri writes for those parameters.
    direct = generate_synthetic_mri(tmp_path / "direct", 20, SIZE, 0.6, seed=3)
    assert _digests(base) == _digests(direct)


def test_ensure_losing_the_rename_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process publishes the set while this one is still generating: ours is discarded."""
    cache_root = tmp_path / "cache"
    real_generate = synthetic.generate_synthetic_mri
    winner: list[Path] = []

    def generate_then_get_overtaken(out_dir: Path, *args: object) -> Path:
        real_generate(out_dir, *args)
        # Simulate the other process: it generates elsewhere and renames into the final place first.
        final = cache_root / out_dir.name.split(".tmp-")[0].lstrip(".")
        other = real_generate(cache_root / "other-process", *args)
        os.replace(other, final)
        (final / "winner-marker").write_text("won")
        winner.append(final)
        return out_dir

    monkeypatch.setattr(synthetic, "generate_synthetic_mri", generate_then_get_overtaken)
    result = ensure_synthetic_dataset(cache_root, n_images=20, image_size=SIZE, seed=5)

    assert winner == [result]
    assert (result / "winner-marker").read_text() == "won"  # the winner's set, not replaced by ours
    assert len(list(result.rglob("*.png"))) == 20
    assert [p.name for p in cache_root.iterdir()] == [result.name]  # our staging copy was removed


def test_ensure_from_concurrent_threads_yields_one_complete_set(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_synthetic_dataset(tmp_path, n_images=20, image_size=SIZE, seed=6))
        except BaseException as error:  # noqa: BLE001 - re-raised below in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]
    assert len(list(results[0].rglob("*.png"))) == 20


def test_ensure_removes_staging_when_generation_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(out_dir: Path, *args: object) -> Path:
        (out_dir / "partial.png").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "generate_synthetic_mri", broken)
    with pytest.raises(OSError, match="disk full"):
        ensure_synthetic_dataset(tmp_path, n_images=20, image_size=SIZE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"n_images": 1}, "n_images=1"),
        ({"n_images": 0}, "n_images=0"),
        ({"tumor_fraction": 0.0}, "tumor_fraction=0.0"),
        ({"tumor_fraction": 1.0}, "tumor_fraction=1.0"),
        ({"tumor_fraction": 1.5}, "tumor_fraction=1.5"),
        ({"tumor_fraction": math.nan}, "tumor_fraction=nan"),
        ({"image_size": 31}, "image_size=31"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(tmp_path: Path, kwargs: dict[str, float], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        generate_synthetic_mri(tmp_path / "gen", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=named):
        ensure_synthetic_dataset(tmp_path / "cache", **kwargs)  # type: ignore[arg-type]
    # Validation happens before anything is written.
    assert list(tmp_path.iterdir()) == []
