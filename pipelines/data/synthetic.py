"""The embedded default data set: deterministic, synthetic, MRI-like axial brain slices.

The platform must run end to end without downloading anything, so when no data folder is given the
pipelines train on images generated here. They are written exactly like a real folder-per-class set
(``tumor/*.png``, ``normal/*.png``) so they go through the same loader as real data, plus a
``lesions.csv`` with the ground-truth lesion position so explanation methods (Grad-CAM) can be
checked against it.

With ``classes`` 3 or 4 the set is multi-class instead, like the public 4-class brain-MRI sets, with
lesion types that differ in location, shape and texture (see :data:`pipelines.data.phantom.LESION_KINDS`) and class
proportions that are imbalanced as real data are (:data:`CLASS_PROPORTIONS`, :func:`class_counts`):
glioma (a large, ill-defined, heterogeneous mass infiltrating one hemisphere, with wide oedema),
meningioma (a bright, homogeneous, sharply bounded round mass on the brain's surface, flattened
against the dura), pituitary (a small round mass on the midline, just in front of the centre) and
notumor (no lesion). ``classes=2`` is the original tumor/normal set, byte for byte.

Each slice is built from the structures a classifier meets in real T1-weighted axial scans: a dark
background, a rotated head ellipse with a bright scalp/skull ring, a thin dark CSF rim, cortex with
sulci, brighter white matter, two dark lateral ventricles, a smooth bias field, slight blur and
Rician noise. Tumour slices add one irregular, heterogeneous, bright lesion (sometimes with a
necrotic core, sometimes barely visible) inside a darker oedema halo. Everything is drawn with
vectorised numpy (no scipy, no per-pixel loops) from per-image child generators of one seed, so the
same parameters always give byte-identical files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.data.phantom import LESION_KINDS, TUMOR, draw_slice

POSITIVE_CLASS = "tumor"
NEGATIVE_CLASS = "normal"

# Bump when the drawing (pipelines.data.phantom) changes: it is part of the cache key, so stale cached sets are never reused.
_GENERATOR_VERSION = "v1"
_LESIONS_FILE = "lesions.csv"

# Multi-class sets: class -> share of the images. Imbalanced like the public sets (the figshare set of
# Cheng et al. has about twice as many gliomas as meningiomas; pituitary tumours and scans without a
# tumour are the rarer classes here), so per-class metrics and class weights have work to do.
CLASS_PROPORTIONS = {
    3: {"glioma": 0.45, "meningioma": 0.30, "notumor": 0.25},
    4: {"glioma": 0.35, "meningioma": 0.25, "notumor": 0.25, "pituitary": 0.15},
}
NO_TUMOR_CLASS = "notumor"


def _validate(n_images: int, image_size: int, tumor_fraction: float, classes: int = 2) -> None:
    """Reject parameters that cannot give a drawable set with every class present, naming the value."""
    if classes not in (2, *CLASS_PROPORTIONS):
        raise ValueError(f"classes={classes}: use 2 (tumor/normal), 3 (glioma, meningioma, notumor) or 4 (+ pituitary)")
    if n_images < 2:
        raise ValueError(f"n_images={n_images}: need at least 2 images (one per class)")
    if classes > 2 and min(class_counts(n_images, classes).values()) < 1:
        raise ValueError(
            f"n_images={n_images}: too few for {classes} classes in the proportions {CLASS_PROPORTIONS[classes]}; use more images"
        )
    if not 0.0 < tumor_fraction < 1.0:  # also rejects NaN
        raise ValueError(f"tumor_fraction={tumor_fraction}: must be strictly between 0 and 1")
    if image_size < 32:
        raise ValueError(f"image_size={image_size}: use 32 or more (smaller heads have no room for anatomy)")


def tumor_count(n_images: int, tumor_fraction: float) -> int:
    """Number of tumour images in a set: ``n_images * tumor_fraction`` rounded half up, clamped to 1..n_images-1.

    Half up rather than Python's banker's rounding so 5 images at 0.5 give 3 tumours, as people
    expect; the clamp keeps both classes present, which a classifier's folder loader needs.
    """
    return min(max(math.floor(n_images * tumor_fraction + 0.5), 1), n_images - 1)


def class_counts(n_images: int, classes: int) -> dict[str, int]:
    """Images per class of a multi-class set: ``n_images`` times :data:`CLASS_PROPORTIONS`, by largest remainder.

    Largest remainder (ties to the earlier class) makes the counts add up to ``n_images`` exactly.
    """
    shares = CLASS_PROPORTIONS[classes]
    exact = {name: n_images * share for name, share in shares.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    by_remainder = sorted(shares, key=lambda name: -(exact[name] - counts[name]))
    for name in by_remainder[: n_images - sum(counts.values())]:
        counts[name] += 1
    return counts


def generate_synthetic_mri(
    out_dir: Path,
    n_images: int = 300,
    image_size: int = 128,
    tumor_fraction: float = 0.6,
    seed: int = 0,
    classes: int = 2,
) -> Path:
    """Write n_images grayscale PNGs into one folder per class under out_dir plus out_dir/lesions.csv; return out_dir.

    ``classes=2``: ``tumor_count(n_images, tumor_fraction)`` of them are tumours (``tumor/``), the rest
    normal (``normal/``). ``classes`` 3 or 4: :func:`class_counts` images of each class of
    :data:`CLASS_PROPORTIONS` (``tumor_fraction`` is not used). The classes are shuffled over the
    indices, and files are numbered globally (``tumor/synth_0007.png``). ``lesions.csv`` has one row per image with columns
    ``file,label,cx,cy,radius``: the path relative to ``out_dir``, the class, and the lesion centre
    (x = column, y = row) and nominal radius in pixels, left empty for images without a tumour.
    """
    _validate(n_images, image_size, tumor_fraction, classes)
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    if classes == 2:
        n_tumor = tumor_count(n_images, tumor_fraction)
        is_tumor = np.zeros(n_images, dtype=bool)
        is_tumor[rng.permutation(n_images)[:n_tumor]] = True
        labels = [POSITIVE_CLASS if tumor else NEGATIVE_CLASS for tumor in is_tumor]
        kinds = {POSITIVE_CLASS: TUMOR, NEGATIVE_CLASS: None}
    else:
        counts = class_counts(n_images, classes)
        labels = [str(name) for name in np.repeat(list(counts), list(counts.values()))[rng.permutation(n_images)]]
        kinds = {name: LESION_KINDS.get(name) for name in counts}
    for label in kinds:
        (out_dir / label).mkdir(parents=True, exist_ok=True)
    # One child generator per image: image i depends only on (seed, i), not on how the others drew.
    children = rng.spawn(n_images)

    width = max(4, len(str(n_images - 1)))
    rows: list[list[str]] = []
    for index, (child, label) in enumerate(zip(children, labels)):
        pixels, lesion = draw_slice(child, image_size, kinds[label])
        relative = f"{label}/synth_{index:0{width}d}.png"
        Image.fromarray(pixels).save(out_dir / relative, format="PNG")
        if lesion is None:
            rows.append([relative, label, "", "", ""])
        else:
            rows.append([relative, label, *(f"{value:.2f}" for value in lesion)])

    # Explicit "\n" line endings keep the file byte-identical across platforms.
    with open(out_dir / _LESIONS_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["file", "label", "cx", "cy", "radius"])
        writer.writerows(rows)
    return out_dir


def ensure_synthetic_dataset(
    cache_root: Path,
    n_images: int = 300,
    image_size: int = 128,
    tumor_fraction: float = 0.6,
    seed: int = 0,
    classes: int = 2,
) -> Path:
    """Return a cached generated set under cache_root/synthetic-v1-<short hash of the parameters>/, generating it only if absent.

    Multi-class sets live in ``synthetic-v1-<classes>class-<hash>/``, their class count in the hash too;
    the binary set's name is the one it always had, so existing caches stay valid.

    Generation goes to a temporary sibling directory that is renamed into place at the end, so a
    directory with the final name is always complete and two processes racing never see a
    half-written set; if the rename loses the race because the other process finished first, this
    process's copy is discarded and the winner's (identical) set is returned.
    """
    _validate(n_images, image_size, tumor_fraction, classes)
    # Plain Python numbers, so numpy scalars hash (and serialise) the same as their values.
    params = {"n_images": int(n_images), "image_size": int(image_size), "tumor_fraction": float(tumor_fraction), "seed": int(seed)}
    mode = ""
    if classes != 2:
        params["classes"] = int(classes)
        mode = f"{int(classes)}class-"
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    cache_root = Path(cache_root)
    final = cache_root / f"synthetic-{_GENERATOR_VERSION}-{mode}{digest}"
    if final.is_dir():
        return final

    cache_root.mkdir(parents=True, exist_ok=True)
    # Same filesystem as the target (a sibling), so the rename below is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_root))
    # mkdtemp makes it owner-only; the published set should be readable like any other cache entry.
    staging.chmod(0o755)
    try:
        generate_synthetic_mri(staging, n_images, image_size, tumor_fraction, seed, classes)
        try:
            os.replace(staging, final)
        except OSError:
            # Renaming onto a non-empty directory fails: another process won. Its set is complete
            # (it appeared only by a rename like ours); anything else is a real error.
            if not final.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final
