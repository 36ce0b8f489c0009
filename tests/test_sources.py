"""Ingestion (pipelines/data/sources.py): every source layout read into one manifest and digest, and the bad input it
refuses, on the real yes/no set and small cases written to tmp (helpers in tests/data_cases.py).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from data_cases import (
    assert_partition_and_groups,
    copy_file,
    ellipse,
    grouped_csv,
    ingest_at,
    real_files,
    tiny_folder,
    write_mode_files,
    write_png,
)

from pipelines.config import BRATS_MODALITIES, PipelineError
from pipelines.data.images import NIFTI_SLICE, decode_image, load_images
from pipelines.data.sources import Dataset, detect_positive_class
from pipelines.data.splits import make_splits
from pipelines.data.volumes import BRATS_PATTERN

README_COUNTS = {"yes": 155, "no": 98}  # from the data README


def test_real_set_ingest(real_dataset: Dataset, real_data_dir: Path) -> None:
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


def test_real_sha256_matches_file_contents(real_dataset: Dataset) -> None:
    for path, sha in real_dataset.manifest[["path", "sha256"]].itertuples(index=False):
        assert sha == hashlib.sha256(Path(path).read_bytes()).hexdigest(), path


def test_real_digest_is_stable(real_dataset: Dataset, real_data_dir: Path, tmp_path: Path) -> None:
    again = ingest_at(real_data_dir, tmp_path)
    assert again.digest == real_dataset.digest
    pd.testing.assert_frame_equal(again.manifest, real_dataset.manifest)


@pytest.fixture
def small_copy(real_data_dir: Path, tmp_path: Path) -> Path:
    """4 yes + 4 no real images copied into tmp."""
    root = tmp_path / "small"
    for label in ("yes", "no"):
        for src in real_files(real_data_dir, label, 4):
            copy_file(src, root / label / src.name)
    return root


def _add_file(root: Path) -> None:
    src = sorted((root / "yes").iterdir())[0]
    copy_file(src, root / "yes" / "an extra copy.jpg")


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
    before = ingest_at(small_copy, tmp_path).digest
    change(small_copy)
    after = ingest_at(small_copy, tmp_path)
    assert after.digest != before


def test_digest_ignores_location_and_restores_after_undo(small_copy: Path, tmp_path: Path) -> None:
    before = ingest_at(small_copy, tmp_path).digest
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(small_copy, moved)
    assert ingest_at(moved, tmp_path).digest == before  # the digest identifies the data, not where it lives
    _add_file(small_copy)
    added = ingest_at(small_copy, tmp_path)
    assert added.digest != before and len(added.manifest) == 9
    (small_copy / "yes" / "an extra copy.jpg").unlink()
    assert ingest_at(small_copy, tmp_path).digest == before


def test_ingest_finds_every_extension_spelling_and_skips_hidden(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _, files = write_mode_files(root / "yes")
    tiny_folder(root, {"no": 2})
    (root / "yes" / ".DS_Store").write_bytes(b"junk")
    write_png(root / "yes" / "._resource fork.jpg", ellipse(8, 8))
    (root / "yes" / "notes.txt").write_text("not an image")
    dataset = ingest_at(root, tmp_path)
    names = {Path(p).name for p in dataset.manifest.loc[dataset.manifest["label"] == "yes", "path"]}
    assert names == {path.name for path, _ in files.values()}


def test_csv_digest_follows_grouping_not_row_order(tmp_path: Path) -> None:
    manifest = grouped_csv(tmp_path / "grouped")
    before = ingest_at(manifest, tmp_path).digest
    header, *rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join([header, *reversed(rows)]) + "\n")
    assert ingest_at(manifest, tmp_path).digest == before  # rows are sorted by path
    regrouped = [rows[0].rsplit(",", 1)[0] + ",patient-new", *rows[1:]]
    manifest.write_text("\n".join([header, *regrouped]) + "\n")
    assert ingest_at(manifest, tmp_path).digest != before  # other groups, other splits: other data


@pytest.mark.parametrize("train_name, test_name", [("Training", "Testing"), ("train", "test")])
def test_split_layout_uses_given_test_split(real_data_dir: Path, tmp_path: Path, train_name: str, test_name: str) -> None:
    root = tmp_path / "split"
    testing = []
    for label in ("yes", "no"):
        files = real_files(real_data_dir, label, 5)
        for src in files[:3]:
            copy_file(src, root / train_name / label / src.name)
        for src in files[3:]:
            testing.append(copy_file(src, root / test_name / label / src.name).resolve())
    dataset = ingest_at(root, tmp_path)
    assert dataset.source == "folder-split"
    assert dataset.class_names == ["no", "yes"] and len(dataset.manifest) == 10
    assert any(" " in Path(p).name for p in dataset.manifest["path"])
    for fraction in (0.2, 0.4):  # the data's own test split wins over test_fraction
        splits = make_splits(dataset, folds=2, test_fraction=fraction, seed=0)
        assert {Path(p) for p in dataset.manifest["path"].iloc[splits.test]} == set(testing)
        assert_partition_and_groups(dataset, splits)


def test_split_layout_needs_both_halves(real_data_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "split"
    for label in ("yes", "no"):
        for src in real_files(real_data_dir, label, 2):
            copy_file(src, root / "Training" / label / src.name)
    with pytest.raises(PipelineError, match="Testing"):
        ingest_at(root, tmp_path)


def test_csv_manifest_relative_paths(tmp_path: Path) -> None:
    root = tmp_path / "csv set"
    tiny_folder(root / "images", {"yes": 3, "no": 3})
    rows = [f"images/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted((root / "images").rglob("*.png"))]
    (root / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    dataset = ingest_at(root / "list.csv", tmp_path)
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
    write_png(tmp_path / "x.png", ellipse(10, 10))
    root = tmp_path / "sub"
    tiny_folder(root, {"yes": 1})
    outside = str(tmp_path / "x.png") if outside == "ABSOLUTE" else outside
    (root / "manifest.csv").write_text(f"path,label\nyes/yes scan 0.png,yes\n{outside},no\n")
    with pytest.raises(PipelineError) as error:
        ingest_at(root / "manifest.csv", tmp_path)
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
    tiny_folder(tmp_path, {"yes": 1})
    (tmp_path / "manifest.csv").write_text(text)
    with pytest.raises(PipelineError, match=needle):
        ingest_at(tmp_path / "manifest.csv", tmp_path)


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
    dataset = ingest_at(tmp_path / "brats", tmp_path)
    assert dataset.source == "brats"
    assert dataset.class_names == ["normal", "tumor"] and dataset.positive_class == "tumor"
    assert set(map(Path, dataset.manifest["path"])) == set(images)
    for path, label, group in dataset.manifest[["path", "label", "group"]].itertuples(index=False):
        volume, index = BRATS_PATTERN.search(Path(path).name).groups()
        assert label == ("tumor" if index == "1" else "normal")
        assert group == f"volume_{volume}"
    splits = make_splits(dataset, folds=2, test_fraction=0.2, seed=0)
    assert_partition_and_groups(dataset, splits)  # slices of one volume stay together
    loaded = load_images(dataset, 32, tmp_path / "cache")
    assert loaded.shape == (len(images), 32, 32, 1) and np.all(np.isfinite(loaded))


@pytest.mark.parametrize("modality, index", [("flair", 0), ("T1", 1), ("t1ce", 2), ("t2", 3), ("0", 0), ("3", 3)])
def test_brats_modality_by_name_and_index(tmp_path: Path, modality: str, index: int) -> None:
    images = _write_brats(tmp_path / "brats", volumes=[1, 2], slices=2)
    dataset = ingest_at(tmp_path / "brats", tmp_path, modality=modality)
    assert dataset.modality == index
    for path, image in images.items():
        np.testing.assert_array_equal(decode_image(path, dataset.modality), image[..., index])


def test_brats_digest_depends_on_modality(tmp_path: Path) -> None:
    _write_brats(tmp_path / "brats", volumes=[1, 2], slices=2)
    digests = {ingest_at(tmp_path / "brats", tmp_path, modality=m).digest for m in BRATS_MODALITIES}
    assert len(digests) == 4  # cached arrays of one channel are never reused for another


@pytest.mark.parametrize("modality", ["dwi", "4"])
def test_brats_unknown_modality(tmp_path: Path, modality: str) -> None:
    _write_brats(tmp_path / "brats", volumes=[1], slices=2)
    with pytest.raises(PipelineError, match="modality"):
        ingest_at(tmp_path / "brats", tmp_path, modality=modality)


def test_brats_missing_mask_names_file_and_key(tmp_path: Path) -> None:
    _write_brats(tmp_path / "brats", volumes=[1, 2], slices=2)
    _write_brats(tmp_path / "brats" / "odd", volumes=[9], slices=1, with_mask=False)
    with pytest.raises(PipelineError) as error:
        ingest_at(tmp_path / "brats", tmp_path)
    assert "volume_9_slice_0.h5" in str(error.value) and "'mask'" in str(error.value)


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel

    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def test_nifti_cases_are_axial_slices_labelled_by_their_segmentation_and_grouped_by_case(tmp_path: Path) -> None:
    from brats_cases import write_nifti_cases

    truth = write_nifti_cases(tmp_path / "nifti", cases=6, depth=4)
    dataset = ingest_at(tmp_path / "nifti", tmp_path)
    assert dataset.source == "nifti" and dataset.modality == 0
    assert dataset.class_names == ["normal", "tumor"] and dataset.positive_class == "tumor"
    seen = set()
    for path, label, group in dataset.manifest[["path", "label", "group"]].itertuples(index=False):
        volume, z = NIFTI_SLICE.match(path).group("file", "z")
        assert Path(volume).name == f"{group}_flair.nii.gz"
        assert label == ("tumor" if truth[group][int(z)] else "normal")
        seen.add((group, int(z)))
    # the empty slices below and above each head are dropped, every other slice is a row
    assert seen == {(case, z) for case, tumour in truth.items() for z in range(1, len(tumour) - 1)}
    assert dataset.manifest["sha256"].is_unique
    splits = make_splits(dataset, folds=2, test_fraction=0.2, seed=0)
    assert_partition_and_groups(dataset, splits)  # slices of one case stay together
    loaded = load_images(dataset, 32, tmp_path / "cache")
    assert loaded.shape == (len(dataset.manifest), 32, 32, 1) and np.all(np.isfinite(loaded))


def test_nifti_slices_are_read_in_ras_orientation_from_the_modality_file(tmp_path: Path) -> None:
    volume = np.arange(5 * 6 * 3, dtype=np.int16).reshape(5, 6, 3) + 1
    for index, name in enumerate(BRATS_MODALITIES):
        _nifti(tmp_path / "set" / "c1" / f"c1_{name}.nii", volume * (index + 1), np.diag([-1.0, -1.0, 1.0, 1.0]))
        _nifti(tmp_path / "set" / "c2" / f"c2_{name}.nii", volume * (index + 1), np.diag([-1.0, -1.0, 1.0, 1.0]))
    for case in ("c1", "c2"):
        seg = np.zeros((5, 6, 3), np.uint8)
        seg[0, 0, 1 if case == "c1" else 2] = 4
        _nifti(tmp_path / "set" / case / f"{case}_seg.nii", seg, np.diag([-1.0, -1.0, 1.0, 1.0]))
    flair, t2 = ingest_at(tmp_path / "set", tmp_path), ingest_at(tmp_path / "set", tmp_path, modality="t2")
    assert flair.digest != t2.digest and all("_t2.nii#z=" in p for p in t2.manifest["path"])
    for path in t2.manifest["path"]:
        z = int(NIFTI_SLICE.match(path)["z"])
        # stored left-right and front-back flipped (as BraTS is): RAS reverses both axes
        np.testing.assert_array_equal(decode_image(path), (volume * 4)[::-1, ::-1, z])
    assert list(t2.manifest["label"]) == ["normal", "tumor", "normal", "normal", "normal", "tumor"]


def test_nifti_slice_selection_keeps_slices_with_a_quarter_of_the_largest_brain_area(tmp_path: Path) -> None:
    volume = np.zeros((10, 10, 6), np.float32)
    for z, side in enumerate([0, 4, 5, 10, 6, 1]):  # brain areas 0, 16, 25, 100, 36, 1 voxels
        volume[:side, :side, z] = 50 + z
    for case in ("a", "b"):
        _nifti(tmp_path / "set" / case / f"{case}_flair.nii.gz", volume)
        _nifti(tmp_path / "set" / case / f"{case}_seg.nii.gz", ((volume > 0) * (case == "a")).astype(np.uint8))
    dataset = ingest_at(tmp_path / "set", tmp_path)
    kept = {int(NIFTI_SLICE.match(p)["z"]) for p in dataset.manifest["path"]}
    assert kept == {2, 3, 4}  # areas >= 25 = a quarter of 100


@pytest.mark.parametrize("remove, needle", [("seg", "Case_001_seg.nii.gz"), ("flair", "Case_001_flair.nii.gz")])
def test_a_nifti_case_without_its_segmentation_or_modality_is_named(tmp_path: Path, remove: str, needle: str) -> None:
    from brats_cases import write_nifti_cases

    write_nifti_cases(tmp_path / "nifti", cases=2, depth=2)
    (tmp_path / "nifti" / "Case_001" / f"Case_001_{remove}.nii.gz").unlink()
    with pytest.raises(PipelineError, match=needle):
        ingest_at(tmp_path / "nifti", tmp_path)


def test_a_nifti_segmentation_of_another_shape_is_named(tmp_path: Path) -> None:
    from brats_cases import write_nifti_cases

    write_nifti_cases(tmp_path / "nifti", cases=2, depth=2)
    _nifti(tmp_path / "nifti" / "Case_000" / "Case_000_seg.nii.gz", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(PipelineError, match="Case_000_seg.nii.gz: shape"):
        ingest_at(tmp_path / "nifti", tmp_path)


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no such folder here"):
        ingest_at(tmp_path / "no such folder here", tmp_path)


def test_data_dir_file_not_csv(tmp_path: Path) -> None:
    (tmp_path / "scans.zip").write_bytes(b"PK")
    with pytest.raises(PipelineError, match="scans.zip"):
        ingest_at(tmp_path / "scans.zip", tmp_path)


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    write_png(tmp_path / "flat" / "a.png", ellipse(10, 10))
    with pytest.raises(PipelineError, match="no class folders"):
        ingest_at(tmp_path / "flat", tmp_path)


def test_empty_class_folder(tmp_path: Path) -> None:
    root = tiny_folder(tmp_path / "set", {"yes": 2})
    (root / "no").mkdir()
    (root / "no" / ".DS_Store").write_bytes(b"junk")
    (root / "no" / "readme.txt").write_text("nothing here")
    with pytest.raises(PipelineError) as error:
        ingest_at(root, tmp_path)
    assert str(root / "no") in str(error.value) and "no images" in str(error.value)


def test_one_class_only(tmp_path: Path) -> None:
    root = tiny_folder(tmp_path / "set", {"yes": 3})
    with pytest.raises(PipelineError, match=r"only one class \(\['yes'\]\)"):
        ingest_at(root, tmp_path)


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
    assert detect_positive_class(classes, requested) == positive


@pytest.mark.parametrize("classes, requested", [(["cat", "dog"], ""), (["no", "yes"], "maybe")])
def test_detect_positive_class_errors(classes: list[str], requested: str) -> None:
    with pytest.raises(PipelineError, match="positive_class"):
        detect_positive_class(classes, requested)


def test_explicit_positive_class_reorders_labels(tmp_path: Path) -> None:
    root = tiny_folder(tmp_path / "set", {"yes": 2, "no": 3})
    dataset = ingest_at(root, tmp_path, positive_class="no")
    assert dataset.class_names == ["yes", "no"] and dataset.positive_class == "no"
    assert list(dataset.labels) == [int(label == "no") for label in dataset.manifest["label"]]
    with pytest.raises(PipelineError, match="positive_class='maybe'"):
        ingest_at(root, tmp_path, positive_class="maybe")


def test_three_classes(tmp_path: Path) -> None:
    root = tiny_folder(tmp_path / "set", {"glioma": 2, "meningioma": 2, "no_tumor": 2})
    dataset = ingest_at(root, tmp_path)
    assert dataset.class_names == ["glioma", "meningioma", "no_tumor"]
    assert dataset.positive_class is None and not dataset.binary
    with pytest.raises(PipelineError, match="only applies to two classes"):
        ingest_at(root, tmp_path, positive_class="glioma")
