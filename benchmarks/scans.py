"""The scans the F1 targets are judged on: a fixed, balanced subsample of the 4-class set read as tumour / no tumour.

Why not the hold-out split: it holds 51 scans, where one scan moves F1 by 0.02-0.03, so targets of 0.02 (teacher -
student) and 0.005 (float32 - INT8) measured one scan of luck. ``Settings.external_per_class`` no-tumour scans
(``notumor/``) and as many tumour scans (``glioma/``, ``meningioma/``, ``pituitary/`` in equal parts), drawn with a
fixed seed, resolve differences a twentieth as large. Scans that duplicate any scan of the benchmark's own data
(about 117 of its 253 are in the 4-class set, re-encoded) are left out by perceptual hash, so no model is scored on
an image it trained on. They come from the same public collections (Br35H, SARTAJ, figshare), and are read by the
project's own readers (a class folder per label, copied into the work folder like the smoke subset).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import EXTERNAL_CLASSES, EXTERNAL_DATA_DIR, Bench
from pipelines.config import Config
from pipelines.data.images import load_images
from pipelines.data.sources import ingest
from pipelines.data.splits import _close_pairs, perceptual_hashes

SEED = 0  # the subsample: fixed, so every run scores the same scans
RESAMPLES = 2000  # paired bootstrap resamples of an F1 difference


@dataclass(frozen=True)
class Scans:
    """Preprocessed images ``(N, S, S, 1)``, their labels (the benchmark data's class indices) and what they are."""

    images: np.ndarray
    labels: np.ndarray
    name: str
    left_out: int = 0  # near-duplicates of the benchmark's own scans


def _choose(per_class: int) -> dict[Path, str]:
    """Source file -> yes/no: ``per_class`` no-tumour scans and as many tumour scans, tumour folders in equal parts."""
    rng = np.random.default_rng(SEED)
    tumour = [folder for folder, label in EXTERNAL_CLASSES.items() if label == "yes"]
    counts = {folder: per_class for folder, label in EXTERNAL_CLASSES.items() if label == "no"}
    counts |= {folder: per_class // len(tumour) + (i < per_class % len(tumour)) for i, folder in enumerate(tumour)}
    chosen = {}
    for folder, count in counts.items():
        files = sorted((EXTERNAL_DATA_DIR / folder).iterdir())
        for index in np.sort(rng.choice(len(files), size=min(count, len(files)), replace=False)):
            chosen[files[index]] = EXTERNAL_CLASSES[folder]
    return chosen


def _holdout(bench: Bench, image_size: int, why: str) -> Scans:
    prepared, test = bench.prepared, bench.prepared.splits.test
    images = prepared.images if image_size == prepared.images.shape[1] else load_images(prepared.dataset, image_size, bench.cfg.cache_dir)
    return Scans(images[test], prepared.dataset.labels[test], f"the {len(test)} hold-out scans ({why})")


def f1_scans(bench: Bench, image_size: int) -> Scans:
    """The F1 targets' scans at ``image_size`` (cached per size on ``bench``); the hold-out split where the 4-class set
    is missing or the benchmark's classes are not yes/no (the synthetic smoke fallback)."""
    if image_size in bench.scans:
        return bench.scans[image_size]
    classes = bench.prepared.dataset.class_names
    if classes != sorted(set(EXTERNAL_CLASSES.values())):
        return _holdout(bench, image_size, f"classes {classes}, not yes/no")
    if not all((EXTERNAL_DATA_DIR / folder).is_dir() for folder in EXTERNAL_CLASSES):
        return _holdout(bench, image_size, f"{EXTERNAL_DATA_DIR} not found")
    folder = bench.work / "f1-scans"
    if not folder.exists():
        for path, label in _choose(bench.settings.external_per_class).items():
            (folder / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, folder / label / path.name)
    dataset = ingest(Config(data_dir=str(folder), cache_dir=bench.cfg.cache_dir))
    assert dataset.class_names == classes, (dataset.class_names, classes)  # labels index the same classes
    images = load_images(dataset, image_size, bench.cfg.cache_dir)
    # Near-duplicates by the splits' own rule, at the benchmark's size (the hash resizes to 32 px either way).
    own = perceptual_hashes(bench.prepared.images)
    mine = perceptual_hashes(
        images if image_size == bench.cfg.image_size else load_images(dataset, bench.cfg.image_size, bench.cfg.cache_dir)
    )
    duplicates = np.unique(_close_pairs(mine, own)[:, 0])
    keep = np.setdiff1d(np.arange(len(images)), duplicates)
    labels = dataset.labels[keep]
    name = (
        f"{len(keep)} scans of {EXTERNAL_DATA_DIR.name} ({int((labels == 1).sum())} tumour, {int((labels == 0).sum())} no tumour; "
        f"{len(duplicates)} near-duplicates of the benchmark's scans left out)"
    )
    bench.scans[image_size] = Scans(images[keep], labels, name, len(duplicates))
    return bench.scans[image_size]


def f1_difference(labels: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray) -> dict[str, float]:
    """F1(a) - F1(b) of two binary classifiers' predictions (1 = positive) on the same scans, with the 95% interval of
    a paired bootstrap (both scored on each resample): how far the difference could move by which scans were drawn."""
    labels, a, b = (np.asarray(x).astype(bool) for x in (labels, predicted_a, predicted_b))
    weights = np.random.default_rng(SEED).multinomial(len(labels), np.full(len(labels), 1 / len(labels)), size=RESAMPLES)

    def f1(predicted: np.ndarray) -> np.ndarray:
        tp, fp, fn = (weights @ (predicted & labels), weights @ (predicted & ~labels), weights @ (~predicted & labels))
        return 2 * tp / np.maximum(2 * tp + fp + fn, 1)

    low, high = np.percentile(f1(a) - f1(b), [2.5, 97.5])
    return {"difference": binary_f1(labels, a) - binary_f1(labels, b), "low": float(low), "high": float(high), "scans": float(len(labels))}


def binary_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """F1 of the positive class (1) of binary predictions, 0 when nothing is predicted or present (as scikit-learn's)."""
    labels, predicted = np.asarray(labels).astype(bool), np.asarray(predicted).astype(bool)
    tp, fp, fn = (predicted & labels).sum(), (predicted & ~labels).sum(), (~predicted & labels).sum()
    return float(2 * tp / max(2 * tp + fp + fn, 1))
