"""External validation (``kd evaluate``): classes matched by name, images the version already saw found by sha256 and by
the perceptual hash and dropped, metrics with bootstrap intervals, and the run linked to the version, on real scans."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from kdtest import MODEL, child_env, tiny_config, tracking_at
from mlflow import MlflowClient
from PIL import Image
from sklearn.metrics import roc_auc_score

from pipelines.config import Config, PipelineError
from pipelines.data.images import decode_image, preprocess
from pipelines.data.splits import hash_bits, hash_text, perceptual_hashes
from pipelines.evaluation.external import match_classes, metrics_with_intervals, point_metrics, training_overlap

BOXES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "br35h-boxes"


def test_classes_match_by_name_and_class_map_renames_or_merges_them():
    assert match_classes(["no", "yes"], ["no", "yes"]).tolist() == [0, 1]
    assert match_classes(["healthy", "tumour"], ["no", "yes"], "tumour:yes,healthy:no").tolist() == [0, 1]
    merged = match_classes(
        ["glioma", "meningioma", "notumor", "pituitary"], ["no", "yes"], "glioma:yes,meningioma:yes,notumor:no,pituitary:yes"
    )
    assert merged.tolist() == [1, 1, 0, 1]


@pytest.mark.parametrize(
    ("data", "class_map", "fragment"),
    [
        (["no", "maybe"], "", "the model does not know ['maybe']; the data has no ['yes']"),
        (["no", "yes", "maybe"], "", "the model does not know ['maybe']"),
        (["no"], "", "the data has no ['yes']"),
        (["no", "yes"], "nope:no", "class_map names ['nope'] not in the data"),
    ],
)
def test_unknown_or_missing_classes_give_one_line_naming_both_lists(data, class_map, fragment):
    with pytest.raises(PipelineError) as error:
        match_classes(data, ["no", "yes"], class_map)
    message = str(error.value)
    assert "\n" not in message and fragment in message
    assert f"the data's classes {data}" in message and "the model's ['no', 'yes']" in message and "class_map=" in message


def test_a_malformed_class_map_is_refused_with_the_config():
    for bad in ("yes", "a:b,a:c", ":no"):
        with pytest.raises(PipelineError, match="^class_map="):
            Config(class_map=bad)


def _preprocessed(paths: list[Path]) -> np.ndarray:
    return np.stack([preprocess(decode_image(path), 64) for path in paths])


def test_overlap_finds_identical_and_re_encoded_copies_of_training_scans_and_nothing_else(real_data_dir, tmp_path):
    import hashlib

    yes = sorted((real_data_dir / "yes").iterdir())
    training_paths, unseen = yes[:12], yes[40:46]
    copy = tmp_path / "copy.jpg"
    shutil.copy(training_paths[0], copy)
    re_encoded = tmp_path / "re-encoded.jpg"  # the same scan saved again: other bytes, other size
    picture = Image.open(training_paths[3]).convert("L")
    picture.resize((int(picture.width * 0.9), int(picture.height * 0.9))).save(re_encoded, quality=70)
    external = [copy, re_encoded, *unseen]

    def manifest(paths):
        return pd.DataFrame({"path": [str(p) for p in paths], "sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]})

    training = manifest(training_paths).assign(split="fold_0")
    training_hashes = hash_bits(hash_text(perceptual_hashes(_preprocessed(training_paths))))  # as logged and read back
    found = training_overlap(manifest(external), perceptual_hashes(_preprocessed(external)), training, training_hashes)
    assert found.index.tolist() == [0, 1]
    assert found["kind"].tolist() == ["identical", "near"]
    assert found["training_path"].tolist() == [str(training_paths[0]), str(training_paths[3])]

    # Without the training images' hashes (older versions, files gone), identical files are still found.
    unhashed = training_overlap(manifest(external), perceptual_hashes(_preprocessed(external)), training, np.zeros_like(training_hashes))
    assert unhashed.index.tolist() == [0]


def test_metrics_come_with_intervals_that_hold_them_and_auc_agrees_with_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    probs = rng.dirichlet([1, 1, 1], 300)
    probs[np.arange(300), labels] += 0.6
    probs /= probs.sum(axis=1, keepdims=True)
    names = ["glioma", "notumor", "pituitary"]
    metrics = metrics_with_intervals(labels, probs, names, resamples=200, seed=1)
    for key in ("accuracy", "f1_macro", "f1_glioma", "precision_notumor", "recall_pituitary", "auc_glioma", "auc_macro"):
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], key
        assert metrics[f"{key}_ci_high"] - metrics[f"{key}_ci_low"] > 0, key
    for index, name in enumerate(names):
        assert metrics[f"auc_{name}"] == pytest.approx(roc_auc_score(labels == index, probs[:, index]))
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["brier"] <= 2

    perfect = point_metrics(labels, np.eye(3)[labels], names)
    assert perfect["accuracy"] == perfect["f1_macro"] == perfect["auc_macro"] == 1.0


# --- the whole command on a registered version --------------------------------------------------------------------


@pytest.fixture(scope="module")
def registered(mri_subset, tmp_path_factory):
    """A version promoted from a tiny search on 24 real scans, in a store of its own."""
    from registry.promote import promote
    from search.tune import run_search

    root = tmp_path_factory.mktemp("evaluate")
    boxes = root / "boxes"  # four real tumour scans with their boxes: promote plays the pointing game on them
    boxes.mkdir()
    for name in ("y0", "y1", "y2", "y3") if BOXES_DIR.is_dir() else ():
        for suffix in (".jpg", ".txt"):
            shutil.copy(BOXES_DIR / f"{name}{suffix}", boxes / f"{name}{suffix}")
    with tracking_at(f"sqlite:///{root / 'mlflow.db'}") as uri:
        given = {"boxes_dir": str(boxes)} if BOXES_DIR.is_dir() else {}
        cfg = tiny_config(mri_subset, root, force=True, study_name="evaluate-test", **given)
        run_search(cfg)
        promotion = promote(cfg)
        yield cfg.replace(boxes_dir=""), promotion.version, uri


@pytest.mark.slow
def test_promote_with_boxes_dir_logs_the_pointing_game_of_student_teacher_and_both_baselines(registered):
    from registry.fetch import resolve_version

    if not BOXES_DIR.is_dir():
        pytest.skip(f"{BOXES_DIR} not found")
    run = MlflowClient().get_run(resolve_version(MODEL, version=registered[1]).run_id)
    for who in ("student", "teacher", "centre", "brightest"):
        assert 0.0 <= run.data.metrics[f"pointing_game_{who}"] <= 1.0
    assert run.data.metrics["pointing_game_scans"] == 4 and run.data.params["boxes_dir"].endswith("boxes")
    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation/pointing_game.csv")))
    assert len(table) == 4 and set(table["class_student"]) == {"yes"}


def external_set(real_data_dir: Path, mri_subset: Path, root: Path) -> list[str]:
    """A folder yes/no of unseen real scans plus three the version trained on (one copied, one re-encoded, one renamed);
    returns the names of those three."""
    for label in ("yes", "no"):
        (root / label).mkdir(parents=True)
        # 50-55: no copy of the 24 scans the version saw among them (40-45 of "no" holds one: a within-set duplicate)
        for path in sorted((real_data_dir / label).iterdir())[50:56]:
            shutil.copy(path, root / label / f"unseen {path.name}")
    seen = sorted((mri_subset / "yes").iterdir())
    shutil.copy(seen[0], root / "yes" / "copied.jpg")
    shutil.copy(seen[1], root / "no" / "renamed-and-mislabelled.jpg")  # identical bytes: found whatever its name or label
    picture = Image.open(seen[2]).convert("L")
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=75)
    (root / "yes" / "re-encoded.jpg").write_bytes(buffer.getvalue())
    return ["copied.jpg", "re-encoded.jpg", "renamed-and-mislabelled.jpg"]


@pytest.mark.slow
def test_evaluate_drops_exactly_the_scans_the_version_saw_and_links_each_run_to_the_version(
    registered, real_data_dir, mri_subset, tmp_path
):
    from registry.external import evaluate_version
    from registry.fetch import describe, resolve_version
    from registry.roles import history

    cfg, version, _ = registered
    seen = external_set(real_data_dir, mri_subset, tmp_path / "external")
    external = cfg.replace(data_dir=str(tmp_path / "external"), experiment_name="external")
    client = MlflowClient()

    dropped = evaluate_version(external, version=version, resamples=200)
    run = client.get_run(dropped)
    metrics, tags = run.data.metrics, run.data.tags
    assert run.info.run_name == "evaluate" and run.info.status == "FINISHED"
    assert tags["kd.model_name"] == MODEL and tags["kd.model_version"] == str(version) and len(tags["kd.data_digest"]) == 64
    assert metrics["overlap_with_training"] == 3 and metrics["n_images"] == 12 and metrics["n_read"] == 15
    listed = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{dropped}/evaluation/overlap_with_training.csv")))
    assert sorted(Path(p).name for p in listed["path"]) == seen
    predicted = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{dropped}/evaluation/predictions.csv")))
    assert len(predicted) == 12 and not set(Path(p).name for p in predicted["path"]) & set(seen)
    for key in ("f1_macro", "accuracy", "f1_yes", "f1_no", "precision_yes", "recall_no", "auc_yes"):
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], key
    assert {"ece", "brier"} <= set(metrics)
    artifacts = {f.path for f in client.list_artifacts(dropped, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/confusion_matrix.json", "evaluation/reliability.png"} <= artifacts

    kept = evaluate_version(external.replace(dedupe="keep"), alias="champion", resamples=200)
    assert client.get_run(kept).data.metrics["n_images"] == 15
    with pytest.raises(PipelineError, match=r"^3 image\(s\) the version already saw"):
        evaluate_version(external.replace(dedupe="error"), version=version, resamples=200)

    found = resolve_version(MODEL, version=version)
    assert found.tags["kd.evaluations"] == f"{dropped},{kept}"  # appended, oldest first
    text = describe(found)
    assert dropped in text and kept in text and "overlap with training 3 (drop)" in text
    assert [entry["event"] for entry in history(MODEL)][-2:] == ["evaluate", "evaluate"]


@pytest.mark.slow
def test_kd_evaluate_refuses_a_data_set_of_other_classes_in_one_line(registered, real_data_dir, tmp_path):
    import subprocess
    import sys

    cfg, version, uri = registered
    for label in ("yes", "maybe"):
        (tmp_path / label).mkdir()
        for path in sorted((real_data_dir / "yes").iterdir())[50:53]:
            shutil.copy(path, tmp_path / label / path.name)
    result = subprocess.run(
        [sys.executable, "-m", "kd", "evaluate", "--model_name", MODEL, "--version", str(version), "--data_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=child_env(MLFLOW_TRACKING_URI=uri),
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the data's classes") and "['no', 'yes']" in last and "maybe" in last, last
