"""Multi-class throughout: the embedded generator's 3- and 4-class sets, and per-class F1, macro-F1 and the
confusion matrix in every step (teacher, distill, search trial, promote) and in `kd fetch`.

The training part is one tiny real pipeline (32 px, 2 folds, 1 epoch, 40 images) in a temporary tracking
store; every per-class figure it logs is recomputed from the logged confusion matrices with scikit-learn.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
from kdtest import MODEL, tiny_config, tracking_at
from mlflow import MlflowClient
from sklearn.metrics import f1_score

from pipelines.config import Config, PipelineError
from pipelines.data.synthetic import CLASS_PROPORTIONS, class_counts, ensure_synthetic_dataset, generate_synthetic_mri
from pipelines.evaluation.metrics import CONFUSION_ARTIFACT, class_keys
from pipelines.names import RunTag

ROOT = Path(__file__).resolve().parents[1]


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "lesions.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------- the generator


@pytest.mark.parametrize("classes", [3, 4])
@pytest.mark.parametrize("n_images", [20, 41, 300])
def test_a_multi_class_set_has_the_documented_class_counts(classes: int, n_images: int) -> None:
    counts = class_counts(n_images, classes)
    assert list(counts) == list(CLASS_PROPORTIONS[classes]) and sum(counts.values()) == n_images
    for name, share in CLASS_PROPORTIONS[classes].items():
        assert abs(counts[name] - n_images * share) < 1, (name, counts)  # largest remainder: off by less than one image
    assert "notumor" in counts and ("pituitary" in counts) == (classes == 4)


def test_the_data_page_documents_the_code_proportions() -> None:
    readme = (ROOT / "docs" / "data.md").read_text()
    for classes, shares in CLASS_PROPORTIONS.items():
        documented = ", ".join(f"{name} {round(share * 100)}%" for name, share in shares.items())
        assert f"{classes} classes: {documented}" in readme


def test_a_4_class_set_is_written_as_documented_and_is_deterministic(tmp_path: Path) -> None:
    root = generate_synthetic_mri(tmp_path / "a", 41, 32, seed=5, classes=4)
    rows = _rows(root)
    on_disk = {name: len(list((root / name).glob("*.png"))) for name in CLASS_PROPORTIONS[4]}
    assert on_disk == class_counts(41, 4)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(CLASS_PROPORTIONS[4])
    # lesions.csv: every image once, its folder is its label, a position exactly for the tumour classes
    assert sorted(row["file"] for row in rows) == sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    for row in rows:
        assert row["file"].split("/")[0] == row["label"]
        assert (row["cx"] == "") == (row["label"] == "notumor"), row
    # the classes are shuffled over the numbering, not in blocks
    labels = [row["label"] for row in sorted(rows, key=lambda r: r["file"].split("/")[1])]
    assert sum(a != b for a, b in zip(labels, labels[1:])) > 10

    assert _digests(generate_synthetic_mri(tmp_path / "b", 41, 32, seed=5, classes=4)) == _digests(root)
    assert set(_digests(generate_synthetic_mri(tmp_path / "c", 41, 32, seed=6, classes=4)).values()).isdisjoint(_digests(root).values())


def test_lesion_types_differ_in_location_and_size(tmp_path: Path) -> None:
    """Pituitary lesions are small and on the midline, meningiomas sit at the brain's edge, gliomas are the
    largest and lie in a hemisphere: the mean statistics of each kind are ordered so on every seed."""
    size = 64
    for seed in (0, 1):
        rows = _rows(generate_synthetic_mri(tmp_path / str(seed), 60, size, seed=seed, classes=4))
        stats = {}
        for kind in ("glioma", "meningioma", "pituitary"):
            chosen = [row for row in rows if row["label"] == kind]
            x, y, radius = (np.array([float(row[c]) for row in chosen]) / size for c in ("cx", "cy", "radius"))
            stats[kind] = {"radius": radius.mean(), "off_midline": np.abs(x - 0.5).mean(), "from_centre": np.hypot(x - 0.5, y - 0.5).mean()}
        glioma, meningioma, pituitary = stats["glioma"], stats["meningioma"], stats["pituitary"]
        assert pituitary["radius"] < 0.6 * meningioma["radius"] and meningioma["radius"] < glioma["radius"], stats
        assert pituitary["off_midline"] < 0.04 < glioma["off_midline"], stats
        assert meningioma["from_centre"] > 1.5 * glioma["from_centre"] and meningioma["from_centre"] > 2 * pituitary["from_centre"], stats


def test_the_cache_key_holds_the_mode_and_the_binary_key_is_unchanged(tmp_path: Path) -> None:
    binary = ensure_synthetic_dataset(tmp_path, n_images=20, image_size=32, seed=3)
    four = ensure_synthetic_dataset(tmp_path, n_images=20, image_size=32, seed=3, classes=4)
    three = ensure_synthetic_dataset(tmp_path, n_images=20, image_size=32, seed=3, classes=3)
    assert re.fullmatch(r"synthetic-v1-[0-9a-f]{12}", binary.name)  # the name binary caches always had
    assert four.name.startswith("synthetic-v1-4class-") and three.name.startswith("synthetic-v1-3class-")
    assert sorted(p.name for p in four.iterdir() if p.is_dir()) == sorted(CLASS_PROPORTIONS[4])
    assert sorted(p.name for p in binary.iterdir() if p.is_dir()) == ["normal", "tumor"]


def test_a_bad_class_count_is_refused_naming_the_value(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"synthetic_classes=5: out of range; use a value in \[2, 4\]"):
        Config(synthetic_classes=5)
    with pytest.raises(ValueError, match=r"classes=1"):
        generate_synthetic_mri(tmp_path, 20, 32, classes=1)


def test_class_keys_are_valid_distinct_mlflow_names() -> None:
    names = ["glioma", "no tumour", "no_tumour", "macro", "Ödem/x", ""]
    keys = class_keys(names)
    assert keys[0] == "glioma" and len(set(keys)) == len(keys) and "macro" not in keys
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", key) for key in keys)


# ---------------------------------------------------------------- the pipeline on a 4-class set


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A one-trial search and a promotion on a 40-image 4-class set, tracked in sqlite (the tests run inside).

    Its runs cover every step: the teacher run (trained by the search), the KD trial, promote, and the
    distill step that promote runs itself (the no-KD cross-validation the report compares with).
    """
    from registry.promote import promote
    from search.tune import run_search

    root = tmp_path_factory.mktemp("multiclass")
    with tracking_at(f"sqlite:///{root / 'mlflow.db'}"):
        cfg = tiny_config("", root, synthetic_images=40, synthetic_classes=4, epochs=1, n_trials=1, study_name="multiclass")
        run_search(cfg)
        version = MlflowClient().get_model_version(MODEL, promote(cfg).version)
        tags = MlflowClient().get_run(version.run_id).data.tags
        yield (
            root,
            {
                "teacher": version.tags["teacher_run_id"],
                "distill": tags[RunTag.NO_KD_CV_RUN_ID],
                "trial": tags[RunTag.TRIAL_RUN_ID],
                "promote": version.run_id,
            },
        )


def _logged(run_id: str) -> tuple[dict, dict[str, float]]:
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{CONFUSION_ARTIFACT}"), MlflowClient().get_run(run_id).data.metrics


def _sklearn_f1(matrix: list[list[int]]) -> np.ndarray:
    """Per-class F1 recomputed by scikit-learn from the (true, predicted) pairs a confusion matrix counts."""
    counts = np.asarray(matrix)
    truth = np.repeat(np.arange(counts.shape[0]), counts.sum(axis=1))
    predicted = np.concatenate([np.repeat(np.arange(counts.shape[1]), row) for row in counts])
    return f1_score(truth, predicted, labels=np.arange(counts.shape[0]), average=None, zero_division=0)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["teacher", "distill", "trial"])
def test_cross_validated_per_class_f1_equals_the_logged_fold_matrices(pipeline, step: str) -> None:
    _, runs = pipeline
    record, metrics = _logged(runs[step])
    params = MlflowClient().get_run(runs["teacher"]).data.params
    assert MlflowClient().get_run(runs[step]).data.tags["kd.step"] == step
    assert record["class_names"] == params["classes"].split(",") == sorted(CLASS_PROPORTIONS[4])
    folds = [record["matrices"][f"fold_{k}"] for k in range(2)]
    assert np.array_equal(np.sum(folds, axis=0), record["matrices"]["out_of_fold"])
    per_fold = np.array([_sklearn_f1(m) for m in folds])
    for index, key in enumerate(record["metric_keys"]):
        assert math.isclose(metrics[f"{key}_mean"], per_fold[:, index].mean(), abs_tol=1e-9), key
        assert math.isclose(metrics[f"{key}_std"], per_fold[:, index].std(ddof=1), abs_tol=1e-9), key
    assert math.isclose(metrics["f1_macro_mean"], per_fold.mean(axis=1).mean(), abs_tol=1e-9)
    # Every class is in every validation fold here, so the existing multi-class f1 (macro over the classes
    # present) is the same number as f1_macro: the old key keeps its meaning beside the new ones.
    assert all(np.all(np.sum(m, axis=1) > 0) for m in folds)
    assert math.isclose(metrics["f1_mean"], metrics["f1_macro_mean"], abs_tol=1e-9)
    assert {"f1_std", "f1_fold_0", "f1_fold_1", "accuracy_mean"} <= metrics.keys()


@pytest.mark.slow
def test_the_teachers_hold_out_figures_equal_its_logged_test_matrix(pipeline) -> None:
    _, runs = pipeline
    record, metrics = _logged(runs["teacher"])
    test = np.asarray(record["matrices"]["test"])
    f1 = _sklearn_f1(test)
    for index, key in enumerate(record["metric_keys"]):
        assert math.isclose(metrics[f"test_{key}"], f1[index], abs_tol=1e-9), key
    assert math.isclose(metrics["test_f1_macro"], f1.mean(), abs_tol=1e-9)
    assert math.isclose(metrics["test_accuracy"], np.trace(test) / test.sum(), abs_tol=1e-9)
    assert math.isclose(metrics["test_f1"], f1[test.sum(axis=0) + test.sum(axis=1) > 0].mean(), abs_tol=1e-9)


@pytest.mark.slow
def test_promotes_hold_out_figures_equal_its_logged_matrices_and_fetch_prints_them(pipeline, capsys) -> None:
    from kd.cli import main as kd_cli

    _, runs = pipeline
    record, metrics = _logged(runs["promote"])
    kd_cli(["fetch", "--model-name", MODEL, "--stage", "Production"])
    printed = capsys.readouterr().out
    for who in ("student", "no_kd", "teacher"):
        matrix = np.asarray(record["matrices"][f"holdout_{who}"])
        f1 = _sklearn_f1(matrix)
        for index, key in enumerate(record["metric_keys"]):
            assert math.isclose(metrics[f"holdout_{who}_{key}"], f1[index], abs_tol=1e-9), (who, key)
        assert math.isclose(metrics[f"holdout_{who}_f1_macro"], f1.mean(), abs_tol=1e-9)
        assert math.isclose(metrics[f"holdout_{who}_accuracy"], np.trace(matrix) / matrix.sum(), abs_tol=1e-9)

    student = np.asarray(record["matrices"]["holdout_student"])
    lines = printed.splitlines()
    start = lines.index("hold-out F1 per class (KD student):")
    for offset, (name, key) in enumerate(zip(record["class_names"], record["metric_keys"]), 1):
        assert lines[start + offset].split() == [name, f"{metrics[f'holdout_student_{key}']:.4f}"]
    assert lines[start + 5].split() == ["macro", f"{metrics['holdout_student_f1_macro']:.4f}"]
    matrix_start = lines.index("hold-out confusion matrix (KD student; rows true, columns predicted):")
    assert lines[matrix_start + 1].split()[-4:] == record["class_names"]
    for offset, (name, row) in enumerate(zip(record["class_names"], student), 2):
        assert lines[matrix_start + offset].split() == [name, *map(str, row)]
    # the version's tags (also printed) carry the per-class figures too
    assert ["holdout_f1_macro", f"{metrics['holdout_student_f1_macro']:.6f}"] in [line.split() for line in lines]
