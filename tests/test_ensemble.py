"""Ensemble teachers (issue 15): ``teacher_arch=resnet:L,hybrid:S`` distils from the mean of its members' logits."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from kdtest import tiny_config, tracking_at

from pipelines.config import MEMBER_SEED_STRIDE, Config, PipelineError, parse_teachers, teacher_members
from pipelines.models.builders import build_teacher
from pipelines.steps.distill import distill
from pipelines.steps.prepare import prepare_data
from pipelines.steps.teacher import LOGITS_ARTIFACT, load_teacher_logits, load_teacher_model, teacher_cv_summary
from registry.report.gather import ensemble_cv

SHA256 = np.array([f"{row:064x}" for row in range(6)])


def test_a_teacher_list_parses_into_one_architecture_and_size_per_member():
    assert parse_teachers("resnet:L, hybrid:S,resnet") == [("resnet", "L"), ("hybrid", "S"), ("resnet", "M")]
    assert parse_teachers("hybrid") == [("hybrid", "M")], "a single teacher is a list of one"


@pytest.mark.parametrize(
    ("spec", "message"),
    [("resnet,,hybrid", "an empty ensemble member"), ("resnet,hybrid:XL", "sizes are S, M, L"), ("resnet,", "an empty ensemble member")],
)
def test_a_bad_member_of_a_teacher_list_is_refused_by_the_configuration(spec, message):
    with pytest.raises(PipelineError, match=f"teacher_arch=.*{message}"):
        Config(teacher_arch=spec)


def test_repeated_members_train_from_other_seeds_while_the_first_of_each_is_the_plain_teacher():
    members = teacher_members(Config(teacher_arch="resnet,hybrid:S,resnet:M,resnet", seed=7))
    assert [(m.teacher_arch, m.teacher_seed_offset) for m in members] == [
        ("resnet", 0),
        ("hybrid:S", 0),
        ("resnet:M", MEMBER_SEED_STRIDE),
        ("resnet", 2 * MEMBER_SEED_STRIDE),
    ], "resnet and resnet:M are one architecture: its repeats are further seeds"
    assert all(m.seed == 7 for m in members), "splits and view keys stay the student's"
    assert len({m.teacher_seed for m in members if m.teacher_arch.startswith("resnet")}) == 3


def _teacher_run(logits: dict[str, np.ndarray], sha256: np.ndarray, models: dict[str, object], root: Path) -> str:
    """A finished teacher run's artifacts, as train_teacher logs them."""
    (root / "models").mkdir(parents=True)
    (root / "logits").mkdir()
    np.savez_compressed(root / LOGITS_ARTIFACT, sha256=sha256.astype("U64"), **logits)
    for name, model in models.items():
        model.save(root / "models" / f"{name}.keras")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(root))
    return run.info.run_id


def test_an_ensembles_cached_logits_are_the_mean_of_its_members_matched_by_sha256(tmp_path):
    rng = np.random.default_rng(0)
    keys = ("fold_0", "fold_1", "all", "views_all")
    shapes = {"fold_0": (6, 3), "fold_1": (6, 3), "all": (6, 3), "views_all": (6, 2, 3)}
    members = [{key: rng.normal(size=shapes[key]).astype(np.float32) for key in keys} for _ in range(3)]
    # Each member stores its rows in its own order: the mean must pair logits of the same image.
    orders = [rng.permutation(6) for _ in members]
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        run_ids = [
            _teacher_run({key: values[key][order] for key in keys}, SHA256[order], {}, tmp_path / f"member_{i}")
            for i, (values, order) in enumerate(zip(members, orders))
        ]
        asked = rng.permutation(6)
        ensemble = load_teacher_logits(",".join(run_ids), SHA256[asked])
    assert sorted(ensemble) == sorted(keys)
    for key in keys:
        expected = np.mean([values[key][asked] for values in members], axis=0)
        np.testing.assert_array_equal(ensemble[key], expected)
        assert not np.allclose(ensemble[key], members[0][key][asked]), "the mean is not one member's logits"


def test_the_online_ensemble_teacher_outputs_the_mean_of_its_members_even_of_one_architecture(tmp_path):
    members = [build_teacher("resnet:S", 32, 3, seed=seed) for seed in (1, 2)] + [build_teacher("hybrid:S", 32, 3, seed=3)]
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 1)).astype(np.float32)
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        run_ids = [_teacher_run({}, SHA256, {"all": model}, tmp_path / f"member_{i}") for i, model in enumerate(members)]
        ensemble = load_teacher_model(",".join(run_ids), "all")
    outputs = [np.asarray(model(images, training=False)) for model in members]
    assert not np.allclose(outputs[0], outputs[1]), "two seeds of one architecture are two teachers"
    np.testing.assert_allclose(np.asarray(ensemble(images, training=False)), np.mean(outputs, axis=0), rtol=1e-5, atol=1e-6)
    assert ensemble.count_params() == sum(model.count_params() for model in members)


def test_an_ensembles_cross_validation_scores_each_fold_by_the_mean_of_its_members_fold_logits(tmp_path):
    # Each member is sure where it is right and unsure where it is wrong: the mean is right on every image.
    sure, unsure = np.array([-3.0, 3.0, 1.0, -1.0]), np.array([1.0, -1.0, -3.0, 3.0])
    labels = np.array([0, 1, 0, 1] * 2)
    logits = [np.concatenate([sure, sure]), np.concatenate([unsure, unsure])]
    splits = pd.DataFrame({"sha256": SHA256[:6].tolist() + [f"{row:064x}" for row in (6, 7)], "label": np.array(["no", "yes"])[labels]})
    splits["split"] = ["fold_0"] * 4 + ["fold_1"] * 4
    sha256 = splits["sha256"].to_numpy()
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        run_ids = [
            _teacher_run({f"fold_{k}": values[:, None].astype(np.float32) for k in range(2)}, sha256, {}, tmp_path / f"member_{i}")
            for i, values in enumerate(logits)
        ]
        members = [teacher_cv_summary(run_id, sha256, labels, [np.arange(4), np.arange(4, 8)], ["no", "yes"]) for run_id in run_ids]
        ensemble = ensemble_cv(",".join(run_ids), splits, ["no", "yes"], Config(folds=2))
    assert ensemble["f1_fold_0"] == ensemble["f1_fold_1"] == ensemble["f1_mean"] == 1.0 and ensemble["f1_std"] == 0.0
    assert all(member["f1_mean"] < 1.0 for member in members), "no member alone is right everywhere"


@pytest.mark.slow
def test_a_student_distils_end_to_end_from_an_ensemble_of_teachers_each_trained_on_the_same_folds(tmp_path):
    cfg = tiny_config("", tmp_path, synthetic_images=40, epochs=1, teacher_arch="resnet:S,hybrid:S,resnet:S", experiment_name="ensemble")
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        run = mlflow.get_run(distill(cfg))
        run_ids = run.data.tags["kd.teacher_run_id"].split(",")
        teachers = [mlflow.get_run(run_id) for run_id in run_ids]
        sha256 = prepare_data(cfg).dataset.manifest["sha256"].to_numpy()
        ensemble = load_teacher_logits(",".join(run_ids), sha256)
        members = [load_teacher_logits(run_id, sha256) for run_id in run_ids]
        splits = {mlflow.artifacts.load_text(f"runs:/{run_id}/data/splits.csv") for run_id in run_ids}
    assert len(set(run_ids)) == 3
    assert [t.data.params["teacher_arch"] for t in teachers] == ["resnet:S", "hybrid:S", "resnet:S"]
    assert [t.data.params["teacher_seed_offset"] for t in teachers] == ["0", "0", str(MEMBER_SEED_STRIDE)]
    assert len(splits) == 1, "every member trained on the student's folds"
    for teacher in teachers:
        assert {"teacher_params", "f1_mean", "f1_std"} <= set(teacher.data.metrics)
    assert not np.allclose(members[0]["all"], members[2]["all"]), "the two resnet:S members differ"
    np.testing.assert_array_equal(ensemble["fold_0"], np.mean([m["fold_0"] for m in members], axis=0))
    assert all(math.isfinite(run.data.metrics[name]) for name in ("f1_mean", "fold_0_distillation_loss", "student_params"))
    assert math.isfinite(run.data.metrics["teacher_f1_mean"]), "the distill run logs the ensemble's own cross-validation"
