"""Small BraTS-style data sets built from the embedded synthetic slices, for tests (pytest puts tests/ on sys.path).

``write_nifti_cases`` writes NIfTI cases (``<case>/<case>_flair.nii.gz``, ``_t1``, ``_t1ce``, ``_t2``,
``_seg.nii.gz``) and ``write_h5_slices`` BraTS2020 ``.h5`` slices (``volume_<v>_slice_<k>.h5``), both from
``pipelines.data.synthetic`` images, so a model trained on them learns something, with the synthetic lesion drawn
as the segmentation. Both return the truth (what each slice's label must be) for the tests' oracles.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.config import BRATS_MODALITIES
from pipelines.data.synthetic import generate_synthetic_mri

# BraTS volumes are stored left-right and front-back flipped against RAS; the loader reorients them.
BRATS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def _synthetic_slices(n: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n synthetic (image uint8 (size, size), lesion mask bool) pairs; the mask is the drawn lesion's disk."""
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic_mri(Path(tmp), n_images=n, image_size=size, tumor_fraction=0.5, seed=seed)
        with open(root / "lesions.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        yy, xx = np.mgrid[0:size, 0:size]
        slices = []
        for row in rows:
            image = np.asarray(Image.open(root / row["file"]).convert("L"))
            mask = np.zeros((size, size), bool)
            if row["cx"]:
                mask = np.hypot(xx - float(row["cx"]), yy - float(row["cy"])) <= max(float(row["radius"]), 1.0)
            slices.append((image, mask))
    return slices


def _modality(image: np.ndarray, index: int) -> np.ndarray:
    """The slice as channel ``index``: distinct intensities per modality, the same anatomy."""
    return image.astype(np.int16) * (index + 1) + 10 * index * (image > 0)


def write_nifti_cases(root: Path, cases: int = 6, depth: int = 6, size: int = 32, seed: int = 0, gz: bool = True) -> dict[str, list[bool]]:
    """Write ``cases`` NIfTI cases under ``root``; returns {case: tumour per axial index z} for every slice.

    Each volume is ``depth`` synthetic slices between an empty slice below and above (z = 0 and depth + 1),
    which the loader's slice selection drops: only z = 1..depth are rows. Voxels are int16 as in BraTS.
    """
    import nibabel

    slices = _synthetic_slices(cases * depth, size, seed)
    truth = {}
    for c in range(cases):
        case = f"Case_{c:03d}"
        folder = Path(root) / case
        folder.mkdir(parents=True, exist_ok=True)
        chunk = slices[c * depth : (c + 1) * depth]
        empty = np.zeros((size, size))
        suffix = ".nii.gz" if gz else ".nii"
        for index, name in enumerate(BRATS_MODALITIES):
            volume = np.stack([empty] + [_modality(image, index) for image, _ in chunk] + [empty], axis=-1).astype(np.int16)
            nibabel.save(nibabel.Nifti1Image(volume, BRATS_AFFINE), folder / f"{case}_{name}{suffix}")
        seg = np.stack([empty] + [mask * 2 for _, mask in chunk] + [empty], axis=-1).astype(np.uint8)  # BraTS labels 1, 2, 4
        nibabel.save(nibabel.Nifti1Image(seg, BRATS_AFFINE), folder / f"{case}_seg{suffix}")
        truth[case] = [False] + [bool(mask.any()) for _, mask in chunk] + [False]
    return truth


def write_h5_slices(root: Path, volumes: int = 6, slices: int = 4, size: int = 32, seed: int = 0) -> dict[Path, bool]:
    """Write BraTS2020-style ``.h5`` slices (``image`` (H, W, 4) float32, ``mask`` (H, W, 3) uint8); returns
    {path: tumour} for every file written."""
    import h5py

    Path(root).mkdir(parents=True, exist_ok=True)
    truth = {}
    for k, (image, mask) in enumerate(_synthetic_slices(volumes * slices, size, seed)):
        path = Path(root) / f"volume_{k // slices + 1}_slice_{k % slices}.h5"
        with h5py.File(path, "w") as handle:
            handle["image"] = np.stack([_modality(image, i) for i in range(len(BRATS_MODALITIES))], axis=-1).astype(np.float32)
            handle["mask"] = np.stack([mask, np.zeros_like(mask), np.zeros_like(mask)], axis=-1).astype(np.uint8)
        truth[path.resolve()] = bool(mask.any())
    return truth
