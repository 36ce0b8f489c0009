"""Splits (pipelines/data/splits.py): the hold-out split and the folds, groups and near-duplicates kept on one side,
on the real yes/no set and small cases written to tmp (helpers in tests/data_cases.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from data_cases import (
    assert_partition_and_groups,
    copy_file,
    data_config,
    grouped_csv,
    ingest_at,
    real_files,
    split_parts,
    tiny_folder,
    write_png,
)
from PIL import Image

from pipelines.config import PipelineError
from pipelines.data.images import decode_image, load_images, preprocess
from pipelines.data.sources import Dataset
from pipelines.data.splits import NEAR_DUPLICATE_BITS, Splits, duplicate_groups, make_splits, perceptual_hashes


@pytest.fixture(scope="module")
def real_splits(real_dataset: Dataset) -> Splits:
    return make_splits(real_dataset, folds=5, test_fraction=0.2, seed=42)


def test_real_splits_partition_and_groups(real_dataset: Dataset, real_splits: Splits) -> None:
    assert len(real_splits.folds) == 5
    assert_partition_and_groups(real_dataset, real_splits)
    assert 0.18 <= len(real_splits.test) / len(real_dataset.manifest) <= 0.22
    np.testing.assert_array_equal(real_splits.train, np.setdiff1d(np.arange(253), real_splits.test))


def test_real_splits_are_stratified(real_dataset: Dataset, real_splits: Splits) -> None:
    labels = real_dataset.labels
    overall = labels.mean()
    for name, rows in split_parts(real_splits).items():
        assert abs(labels[rows].mean() - overall) < 0.05, (name, labels[rows].mean(), overall)
    for train, _ in real_splits.folds:
        assert abs(labels[train].mean() - overall) < 0.05


def test_real_splits_deterministic_per_seed(real_dataset: Dataset, real_splits: Splits) -> None:
    same = make_splits(real_dataset, folds=5, test_fraction=0.2, seed=42)
    np.testing.assert_array_equal(same.test, real_splits.test)
    for (a_train, a_val), (b_train, b_val) in zip(same.folds, real_splits.folds):
        np.testing.assert_array_equal(a_train, b_train)
        np.testing.assert_array_equal(a_val, b_val)
    other = make_splits(real_dataset, folds=5, test_fraction=0.2, seed=7)
    assert not np.array_equal(other.test, real_splits.test)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(other.folds, real_splits.folds))


def test_splits_table_labels(real_dataset: Dataset, real_splits: Splits) -> None:
    table = real_splits.table(real_dataset)
    assert list(table.columns) == ["path", "label", "group", "sha256", "split"]
    assert list(table["path"]) == list(real_dataset.manifest["path"])
    expected = pd.Series("", index=table.index, dtype=object)
    for name, rows in split_parts(real_splits).items():
        expected.iloc[rows] = name
    assert (table["split"] == expected).all()
    assert set(table["split"]) == {"test", *(f"fold_{k}" for k in range(5))}


def test_repeats_give_folds_times_repeats_entries_each_repeat_a_new_partition_of_the_same_rest(
    real_dataset: Dataset, real_splits: Splits
) -> None:
    repeated = make_splits(real_dataset, folds=5, test_fraction=0.2, seed=42, repeats=2)
    assert len(repeated.folds) == 10 and repeated.repeats == 2
    assert_partition_and_groups(real_dataset, repeated)
    np.testing.assert_array_equal(repeated.test, real_splits.test)  # the hold-out is made once
    for (a_train, a_val), (b_train, b_val) in zip(repeated.folds[:5], real_splits.folds):  # repeat 0 is the unrepeated k-fold
        np.testing.assert_array_equal(a_train, b_train)
        np.testing.assert_array_equal(a_val, b_val)
    first, second = ({k: set(val) for k, (_, val) in enumerate(repeated.folds[r * 5 : r * 5 + 5])} for r in (0, 1))
    assert all(first[k] != second[j] for k in first for j in second), "repeat 1 repeats a fold of repeat 0"
    table = repeated.table(real_dataset)
    assert list(table.columns) == ["path", "label", "group", "sha256", "split", "split_repeat_1"]
    assert set(table["split_repeat_1"]) == {"test", *(f"fold_{k}" for k in range(5, 10))}
    for k in range(5, 10):
        np.testing.assert_array_equal(np.flatnonzero(table["split_repeat_1"] == f"fold_{k}"), np.sort(repeated.folds[k][1]))


@pytest.mark.parametrize("seed", [0, 3])
def test_groups_never_straddle_train_and_validation_in_any_repeat(tmp_path: Path, seed: int) -> None:
    dataset = ingest_at(grouped_csv(tmp_path / "grouped"), tmp_path)
    splits = make_splits(dataset, folds=3, test_fraction=0.2, seed=seed, repeats=3)
    assert len(splits.folds) == 9
    assert_partition_and_groups(dataset, splits)
    groups = dataset.manifest["group"].to_numpy()
    for train, val in splits.folds:
        assert set(groups[train]).isdisjoint(groups[val])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_groups_never_straddle_parts(tmp_path: Path, seed: int) -> None:
    dataset = ingest_at(grouped_csv(tmp_path / "grouped"), tmp_path)
    assert dataset.source == "csv"
    assert dataset.manifest["group"].nunique() == 14 and len(dataset.manifest) > 14
    splits = make_splits(dataset, folds=3, test_fraction=0.2, seed=seed)
    assert_partition_and_groups(dataset, splits)


def test_too_few_per_class_for_folds_real(real_dataset: Dataset) -> None:
    with pytest.raises(PipelineError) as error:
        make_splits(real_dataset, folds=100, test_fraction=0.2, seed=42)
    assert "folds=100" in str(error.value) and "'no'" in str(error.value)


def test_too_few_per_class_for_hold_out(tmp_path: Path) -> None:
    dataset = ingest_at(tiny_folder(tmp_path / "set", {"yes": 6, "no": 3}), tmp_path)
    with pytest.raises(PipelineError) as error:
        make_splits(dataset, folds=2, test_fraction=0.2, seed=0)
    assert "'no'" in str(error.value) and "hold-out" in str(error.value)


def test_too_few_groups_counts_groups_not_images(tmp_path: Path) -> None:
    """10 'no' images but only 2 patients: not enough for 3 folds."""
    lines = ["path,label,group"]
    for i in range(12):
        write_png(tmp_path / f"y{i}.png", np.full((8, 8), i, np.uint8))
        lines.append(f"y{i}.png,yes,py{i}")
    for i in range(10):
        write_png(tmp_path / f"n{i}.png", np.full((8, 8), 100 + i, np.uint8))
        lines.append(f"n{i}.png,no,pn{i % 2}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    dataset = ingest_at(tmp_path / "manifest.csv", tmp_path)
    with pytest.raises(PipelineError, match=r"class 'no' has 2 image group\(s\)"):
        make_splits(dataset, folds=3, test_fraction=0.2, seed=0)


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
    real_decoded, real_dataset: Dataset, tmp_path: Path
) -> None:
    images, _ = real_decoded
    hashes = perceptual_hashes(images)
    assert hashes.shape == (253, 143) and hashes.dtype == bool
    distance = _distances(hashes, hashes)
    correlation = np.corrcoef(images.reshape(len(images), -1))
    sha = real_dataset.manifest["sha256"].to_numpy()
    pairs = np.triu_indices(len(images), 1)
    different_files = sha[pairs[0]] != sha[pairs[1]]
    # Different scans (not re-saved copies: the preprocessed images correlate below 0.9) are never matched ...
    different = different_files & (correlation[pairs] < 0.9)
    assert distance[pairs][different].min() > NEAR_DUPLICATE_BITS
    # ... and every match among different files is one scan saved twice (the real set holds such copies).
    matched = different_files & (distance[pairs] <= NEAR_DUPLICATE_BITS)
    assert matched.any() and correlation[pairs][matched].min() > 0.95
    print(
        f"\nreal set, {different.sum()} pairs of different scans: min distance {distance[pairs][different].min()}, "
        f"0.1th percentile {np.percentile(distance[pairs][different], 0.1):.0f}; "
        f"{matched.sum()} re-saved pairs matched, max distance {distance[pairs][matched].max()}"
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
        copied = np.stack([preprocess(decode_image(make(Path(paths[r]), tmp_path / f"{name} {r}.img")), 32) for r in rows])
        to_original = np.diag(_distances(perceptual_hashes(copied), hashes[rows]))
        assert to_original.max() <= NEAR_DUPLICATE_BITS, (name, to_original)
        print(f"{name}: distances to the original {sorted(to_original.tolist())}")


def _leaky_split_set(real_data_dir: Path, root: Path) -> dict[str, set[str]]:
    """Training/ + Testing/ from real scans, Testing holding 2 byte-identical copies and 2 re-saved copies
    (JPEG re-encode, 0.9x rescale) of Training scans besides 4 scans of its own. Returns the copies' names."""
    for label in ("yes", "no"):
        files = real_files(real_data_dir, label, 8, offset=20)
        for src in files[:6]:
            copy_file(src, root / "Training" / label / src.name)
        for src in files[6:]:
            copy_file(src, root / "Testing" / label / src.name)
    training = {label: sorted((root / "Training" / label).iterdir()) for label in ("yes", "no")}
    copy_file(training["yes"][0], root / "Testing" / "yes" / "copy of yes 0.jpg")
    copy_file(training["no"][1], root / "Testing" / "no" / "copy of no 1.jpg")
    _resaved(training["yes"][2], root / "Testing" / "yes" / "re-encoded yes 2.jpg", quality=60)
    _resaved(training["no"][3], root / "Testing" / "no" / "rescaled no 3.png", 0.9, "PNG")
    return {"identical": {"copy of yes 0.jpg", "copy of no 1.jpg"}, "near": {"re-encoded yes 2.jpg", "rescaled no 3.png"}}


def test_duplicates_across_a_given_split_are_dropped_from_the_holdout_logged_and_printed(
    real_data_dir: Path, tmp_path: Path, capsys
) -> None:
    import mlflow
    from kdtest import tracking_at

    from pipelines.steps.prepare import prepare, prepare_data

    copies = _leaky_split_set(real_data_dir, tmp_path / "leaky")
    cfg = data_config(tmp_path / "leaky", tmp_path / "cache", image_size=32, folds=2, experiment_name="dedupe")
    prepared = prepare_data(cfg)
    dataset, splits = prepared.dataset, prepared.splits
    assert (
        "prepare: 4 hold-out image(s) duplicate training images (2 identical, 2 near-identical within 16 hash bits): "
        "dropped from the hold-out, 4 left" in capsys.readouterr().out
    )
    names = dataset.manifest["path"].map(lambda p: Path(p).name).to_numpy()
    duplicates = splits.duplicates
    assert {kind: set(names[duplicates.index[duplicates["kind"] == kind]]) for kind in ("identical", "near")} == copies
    assert (duplicates.loc[duplicates["kind"] == "identical", "distance"] == 0).all()
    assert duplicates["distance"].between(0, NEAR_DUPLICATE_BITS).all()
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
    from pipelines.steps.prepare import prepare_data

    _leaky_split_set(real_data_dir, tmp_path / "leaky")
    cfg = data_config(tmp_path / "leaky", tmp_path / "cache", image_size=32, folds=2)
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
        for src in real_files(real_data_dir, label, 10, offset=40):
            copy_file(src, root / label / src.name)
        for k, src in enumerate(sorted((root / label).iterdir())[:3]):
            original_of[_resaved(src, root / label / f"re-encoded {k}.jpg", quality=60).resolve()] = src.resolve()
    dataset = ingest_at(root, tmp_path)
    hashes = perceptual_hashes(load_images(dataset, 32, tmp_path / "cache"))
    merged = duplicate_groups(dataset, hashes)
    row_of = {Path(p): row for row, p in enumerate(dataset.manifest["path"])}
    copies = np.array([row_of[copy] for copy in original_of])
    assert all(merged[row_of[copy]] == merged[row_of[original]] for copy, original in original_of.items())
    originals = np.setdiff1d(np.arange(len(merged)), copies)
    assert set(merged) == set(merged[originals])  # a copy never starts a group of its own
    assert set(dataset.manifest["group"].to_numpy()[originals]) >= set(merged)  # groups are joined, never invented
    for seed in range(3):
        splits = make_splits(dataset, folds=2, test_fraction=0.25, seed=seed, hashes=hashes)
        assert splits.duplicates is None and splits.dropped.size == 0
        assert list(splits.table(dataset)["group"]) == list(merged)  # the logged table shows the groups split by
        part = {row: name for name, rows in split_parts(splits).items() for row in rows}
        for copy, original in original_of.items():
            assert part[row_of[copy]] == part[row_of[original]], (seed, copy.name)
