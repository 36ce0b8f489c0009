"""Ingestion, preprocessing and splits: from a folder of scans to arrays and folds.

``ingest`` turns any supported source into one manifest (path, label, group, sha256, given split) and a
digest that identifies the data; ``load_images`` decodes and preprocesses every image once (cached on
disk); ``make_splits`` gives the hold-out test split and stratified group k-fold on the rest.

Sources: a folder per class (flat, or ``Training/`` + ``Testing/``), BraTS2020 ``.h5`` slices, a CSV
manifest, and (``data_dir`` empty) the embedded synthetic set, which is read back through the folder loader.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import StratifiedGroupKFold

from pipelines.config import BRATS_MODALITIES, Config, PipelineError, modality_index

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_DIR_NAMES = {"training": "train", "train": "train", "testing": "test", "test": "test"}
BRATS_PATTERN = re.compile(r"volume_(\d+)_slice_(\d+)\.h5$")
POSITIVE_NAMES = {"yes", "tumor", "tumour", "tumors", "tumours", "positive", "pos", "abnormal", "malignant", "lesion", "1", "true"}
NEGATIVE_NAMES = {"no", "normal", "healthy", "negative", "neg", "no_tumor", "no_tumour", "notumor", "notumour", "no-tumor", "0", "false"}
# Decompression-bomb guard: the largest real scans here are 1920x1080; 50 Mpx leaves room, refuses bombs.
MAX_PIXELS = 50_000_000
# Bumped whenever preprocessing changes, so cached arrays from an older version are never reused.
PREPROCESS_VERSION = 2


@dataclass(frozen=True)
class Dataset:
    """A manifest and what identifies it. Rows are sorted by path so order never depends on the file system."""

    manifest: pd.DataFrame  # columns: path, label, group, sha256, given_split ("train", "test" or "")
    class_names: list[str]  # binary: [negative, positive], so index 1 is the positive class
    positive_class: str | None
    source: str  # folder, folder-split, brats, csv, synthetic
    root: Path
    modality: int | None
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

    @property
    def train(self) -> np.ndarray:
        """Every non-test row (what the all-data models train on)."""
        return np.sort(np.concatenate([self.folds[0][0], self.folds[0][1]]))

    def table(self, dataset: Dataset) -> pd.DataFrame:
        """One row per image with its assignment (``test`` or ``fold_<k>``), for logging."""
        assignment = np.empty(len(dataset.manifest), dtype=object)
        assignment[self.test] = "test"
        for k, (_, val) in enumerate(self.folds):
            assignment[val] = f"fold_{k}"
        frame = dataset.manifest[["path", "label", "group", "sha256"]].copy()
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
        raise PipelineError(f"{path}: links to {target}, outside data_dir {data_root}; copy the file into the data folder instead of linking it")


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
            raise PipelineError(f"{path}: a link to a folder ({path.resolve()}), which is not followed; move or copy the images into the data folder")
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
            raise PipelineError(f"{class_dir}: class folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder")
        for path in files:
            # No patient ids in these sets: the group is the image's content (see ingest).
            rows.append({"path": str(path), "label": class_dir.name, "group": "", "given_split": given_split})
    return rows


def _split_folder_rows(root: Path, split_dirs: dict[str, Path]) -> list[dict]:
    if set(split_dirs) != {"train", "test"}:
        raise PipelineError(f"{root}: found {sorted(p.name for p in split_dirs.values())}; a split layout needs both Training/ and Testing/")
    rows = []
    for split, folder in split_dirs.items():
        rows += _folder_rows(folder, root, given_split=split)
    return rows


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A BraTS slice's image and mask, checked: the mask decides the label, so a mask that is not plain
    finite numbers would silently label the slice (NaN > 0 is False: "normal")."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            missing = [key for key in ("image", "mask") if not isinstance(handle.get(key), h5py.Dataset)]
            if missing:
                raise PipelineError(f"{path}: no dataset(s) {missing} (keys found: {sorted(handle.keys())}); BraTS slices need 'image' (H,W,4) and 'mask' (H,W,3)")
            image, mask = np.asarray(handle["image"]), np.asarray(handle["mask"])
    except (OSError, TypeError, ValueError) as error:  # h5py: unreadable file; numpy: a dtype it cannot represent
        raise PipelineError(f"{path}: not a readable HDF5 file ({error}); remove or replace it") from error
    for key, array in (("image", image), ("mask", mask)):
        if array.dtype.kind not in "biuf":  # bool, signed, unsigned, float: no strings, complex, records or times
            raise PipelineError(f"{path}: {key!r} has dtype {array.dtype}; expected real numbers (integers or floats)")
    if image.ndim != 3 or image.shape[-1] != len(BRATS_MODALITIES):
        raise PipelineError(f"{path}: 'image' has shape {image.shape}; expected (H, W, 4) with channels {BRATS_MODALITIES}")
    if mask.shape != image.shape[:2] + (3,):
        raise PipelineError(f"{path}: 'mask' has shape {mask.shape}; expected {image.shape[:2] + (3,)} (H, W, 3), like the image")
    if not np.all(np.isfinite(mask)):
        raise PipelineError(f"{path}: 'mask' has NaN or infinite values, so the slice's label is unknown; fix or remove the file")
    return image, mask


def _brats_rows(root: Path, files: list[Path]) -> list[dict]:
    rows = []
    for path in files:
        _check_data_file(path, root)
        _, mask = _read_h5(path)
        volume = BRATS_PATTERN.search(path.name).group(1)
        rows.append({"path": str(path), "label": "tumor" if np.any(mask > 0) else "normal", "group": f"volume_{volume}", "given_split": ""})
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
            raise PipelineError(f"{csv_path}:{line}: {len(fields)} field(s) where the header has {len(header)}; quote paths that contain commas")
        record = dict(zip(header, fields))
        # Surrounding spaces would make "yes " a class of its own beside "yes".
        label, group = record["label"].strip(), record.get("group", "").strip()
        try:
            path = (root / record["path"]).resolve()
            exists = path.is_file()
        except (OSError, ValueError) as error:  # a NUL byte, a name longer than the file system allows
            raise PipelineError(f"{csv_path}:{line}: path {record['path']!r} is not a usable file name ({error})") from None
        if not path.is_relative_to(root):
            raise PipelineError(f"{csv_path}:{line}: path {record['path']!r} points outside {root}; keep images under the manifest's folder")
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

        return ensure_synthetic_dataset(Path(cfg.cache_dir), n_images=cfg.synthetic_images, seed=0), "synthetic"
    root = Path(cfg.data_dir).expanduser().resolve()
    if not root.exists():
        raise PipelineError(f"data_dir={cfg.data_dir!r} does not exist; give a folder of class folders, a BraTS .h5 folder or a CSV manifest")
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
        split_dirs = {SPLIT_DIR_NAMES[p.name.lower()]: p for p in _class_dirs(root) if p.name.lower() in SPLIT_DIR_NAMES}
        if brats_files:
            source, modality = "brats", modality_index(cfg.modality)
            rows = _brats_rows(root, brats_files)
        elif split_dirs:
            source = "folder-split"
            rows = _split_folder_rows(root, split_dirs)
        else:
            rows = _folder_rows(root, root)
    manifest = pd.DataFrame(rows, columns=["path", "label", "group", "given_split"]).sort_values("path", ignore_index=True)
    manifest.insert(3, "sha256", [sha256_file(Path(p)) for p in manifest["path"]])
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


def decode_image(path: Path | io.BytesIO, modality: int | None = None, name: str | None = None) -> np.ndarray:
    """A 2-D float32 intensity image, decoded by content (a PNG named .jpg is fine), any mode or size.

    ``path`` may be an in-memory file; ``name`` is what error messages call it (default: the path).
    """
    name = name or (shown(path) if isinstance(path, (str, Path)) else str(path))
    if modality is not None:
        image, _ = _read_h5(path)
        pixels = image[..., modality].astype(np.float32)
    else:
        pixels = _decode_picture(path, name)
    # Float TIFFs and HDF5 slices can hold NaN or infinity (or float64 values beyond float32's range).
    if not np.all(np.isfinite(pixels)):
        raise PipelineError(f"{name}: image has NaN or infinite pixels (or values beyond float32's range); fix or remove the file")
    return pixels


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


def decode_bytes(payload: bytes, name: str = "image") -> np.ndarray:
    """Like :func:`decode_image` for an in-memory file (used by the serving wrapper)."""
    return decode_image(io.BytesIO(payload), name=name)


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
        raise PipelineError(f"pixel values span {image.min():.3g} to {image.max():.3g}, too close to float32's limit to resize; rescale the image")
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


def make_splits(dataset: Dataset, folds: int, test_fraction: float, seed: int) -> Splits:
    """Hold-out test split (the data's own, else stratified by group), then stratified group k-fold.

    Groups (patients, volumes) never straddle the test split or two folds. Deterministic for a seed.
    """
    labels, groups = dataset.labels, dataset.manifest["group"].to_numpy()
    given = dataset.manifest["given_split"].to_numpy()
    if (given == "test").any():
        test = np.flatnonzero(given == "test")
    else:
        n_test_splits = max(2, round(1 / test_fraction))
        _check_enough(dataset, np.arange(len(labels)), n_test_splits, "the hold-out split")
        splitter = StratifiedGroupKFold(n_splits=n_test_splits, shuffle=True, random_state=seed)
        _, test = next(splitter.split(np.zeros(len(labels)), labels, groups))
    rest = np.setdiff1d(np.arange(len(labels)), test)
    _check_enough(dataset, rest, folds, f"folds={folds}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_indices = [(rest[train], rest[val]) for train, val in splitter.split(np.zeros(len(rest)), labels[rest], groups[rest])]
    return Splits(test=np.sort(test), folds=fold_indices)


def _check_enough(dataset: Dataset, rows: np.ndarray, n_splits: int, what: str) -> None:
    frame = dataset.manifest.iloc[rows]
    for name in dataset.class_names:
        n_groups = frame.loc[frame["label"] == name, "group"].nunique()
        if n_groups < n_splits:
            raise PipelineError(f"class {name!r} has {n_groups} image group(s) where {what} needs at least {n_splits}; add images or lower folds")
