"""Small data sets and checks shared by tests/test_sources.py, test_images.py and test_splits.py (pytest puts tests/
on sys.path): images drawn with numpy, real scans copied into tmp, and the partition check of a split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.config import Config
from pipelines.data.sources import Dataset, ingest
from pipelines.data.splits import Splits


def data_config(data_dir: Path | str, cache_dir: Path, **changes) -> Config:
    return Config(data_dir=str(data_dir), cache_dir=str(cache_dir), **changes)


def ingest_at(data_dir: Path | str, tmp_path: Path, **changes) -> Dataset:
    return ingest(data_config(data_dir, tmp_path / "cache", **changes))


def ellipse(height: int, width: int, canvas: tuple[int, int] | None = None) -> np.ndarray:
    """A textured bright ellipse (the 'head', values ~110..190) on a zero background, uint8."""
    rows, cols = canvas or (height, width)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    inside = ((yy - cy) / (height / 2)) ** 2 + ((xx - cx) / (width / 2)) ** 2 <= 1.0
    texture = 150 + 40 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    return np.where(inside, np.round(texture), 0).astype(np.uint8)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def tiny_folder(root: Path, counts: dict[str, int], size: int = 40) -> Path:
    """A folder per class of small, distinct, decodable PNGs (names with spaces)."""
    for c, (label, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            image = ellipse(size - 8 - (i % 5), size - 10, canvas=(size, size))
            image = np.where(image > 0, image // 2 + 10 * c + i, 0).astype(np.uint8)
            write_png(root / label / f"{label} scan {i}.png", image)
    return root


def copy_file(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)  # copyfile, not copy: the shared originals are read-only
    return dst


def real_files(real_data_dir: Path, label: str, n: int, offset: int = 0) -> list[Path]:
    """n real files of a class, names with spaces first."""
    files = sorted((real_data_dir / label).iterdir(), key=lambda p: (" " not in p.name, p.name))
    return files[offset : offset + n]


def split_parts(splits: Splits, repeat: int = 0) -> dict[str, np.ndarray]:
    """The hold-out and the validation parts of one repeat's folds (entries k = repeat * folds + f)."""
    per_repeat = len(splits.folds) // splits.repeats
    entries = range(repeat * per_repeat, (repeat + 1) * per_repeat)
    return {"test": splits.test, **{f"fold_{k}": splits.folds[k][1] for k in entries}}


def assert_partition_and_groups(dataset: Dataset, splits: Splits) -> None:
    """In every repeat, test + each fold's validation part cover each row exactly once; no group in two parts."""
    rest = np.setdiff1d(np.arange(len(dataset.manifest)), splits.test)
    for train, val in splits.folds:
        assert np.intersect1d(train, val).size == 0
        assert np.array_equal(np.sort(np.concatenate([train, val])), rest)
    groups = dataset.manifest["group"].to_numpy()
    for repeat in range(splits.repeats):
        parts = split_parts(splits, repeat)
        everything = np.concatenate(list(parts.values()))
        assert np.array_equal(np.sort(everything), np.arange(len(dataset.manifest))), f"repeat {repeat} is no partition"
        owner: dict[str, str] = {}
        for name, rows in parts.items():
            for group in set(groups[rows]):
                assert group not in owner, f"repeat {repeat}: group {group!r} is in both {owner[group]} and {name}"
                owner[group] = name


def grouped_csv(root: Path) -> Path:
    """14 'patients' with 1-3 slices each, slices of both classes in some patients."""
    lines = ["path,label,group"]
    for patient in range(14):
        for k in range(1 + patient % 3):
            label = "tumor" if (patient + k) % 2 == 0 else "normal"
            relative = f"scans/patient {patient} slice {k}.png"
            write_png(root / relative, np.full((8, 8), 10 * patient + k, np.uint8))
            lines.append(f"{relative},{label},patient-{patient}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def write_mode_files(folder: Path) -> tuple[np.ndarray, dict[str, tuple[Path, str]]]:
    """The same picture saved in several modes / formats / extension spellings."""
    folder.mkdir(parents=True, exist_ok=True)
    base = ellipse(40, 30, canvas=(48, 40))
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
