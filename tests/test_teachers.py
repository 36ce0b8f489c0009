"""Teachers worth distilling from (issue 15): a high-resolution teacher for a low-resolution student, and
consistent distillation (Beyer et al. 2022), where teacher and student see the same augmented view."""

from __future__ import annotations

import math
import tempfile

import keras
import mlflow
import numpy as np
import pytest
from kdtest import tiny_config, tracking_at

from pipelines.config import Config, PipelineError, distill_params
from pipelines.data.images import load_images, preprocess
from pipelines.evaluation.metrics import model_logits
from pipelines.models.builders import build_student, build_teacher, load_keras_model
from pipelines.models.distiller import Distiller, hard_loss
from pipelines.steps.distill import cross_validate_student, distill, mixes_views
from pipelines.steps.prepare import prepare_data
from pipelines.steps.teacher import load_teacher_logits, load_teacher_model
from pipelines.tracking.runs import step_key
from pipelines.training.fit import make_dataset, train_on_all_data
from pipelines.training.views import image_keys, view_logits, views_of
from registry.explain import explain_scan

RNG = np.random.default_rng(0)
SHA256 = np.array([f"{row:064x}" for row in range(12)])


def _smooth_images(count: int, size: int) -> np.ndarray:
    """Blobs at different places: smooth enough for a view at two resolutions to be compared."""
    axis = np.linspace(-1.0, 1.0, size)
    centres = RNG.uniform(-0.5, 0.5, (count, 2))
    blobs = [np.exp(-((axis[:, None] - cy) ** 2 + (axis[None, :] - cx) ** 2) * 8.0) for cy, cx in centres]
    return np.stack(blobs)[..., None].astype(np.float32)


def test_an_online_teacher_at_another_size_than_the_student_is_refused_naming_both_sizes_and_the_fix():
    with pytest.raises(
        PipelineError, match=r"teacher_mode=online with teacher_image_size=128 and image_size=64: .*use teacher_mode=cached"
    ):
        Config(teacher_mode="online", teacher_image_size=128)
    assert Config(teacher_mode="online", teacher_image_size=64).teacher_size == 64, "the student's own size is no change"
    assert Config(teacher_mode="cached", teacher_image_size=128).teacher_size == 128
    assert Config().teacher_size == Config().image_size, "0 means the student's image_size"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"teacher_image_size": 16}, r"teacher_image_size=16: use 0 \(the student's image_size\) or a size in \[32, 512\]"),
        ({"teacher_image_size": 1024}, r"teacher_image_size=1024: out of range"),
        ({"kd_mode": "patient"}, r"kd_mode='patient': use standard or consistent"),
        ({"kd_views": 0}, r"kd_views=0: out of range"),
    ],
)
def test_bad_teacher_sizes_kd_modes_and_view_counts_are_refused(changes, message):
    with pytest.raises(PipelineError, match=message):
        Config(**changes)


def test_the_same_seed_gives_the_same_views_and_another_seed_or_view_number_other_ones():
    images = RNG.normal(size=(6, 32, 32, 1)).astype(np.float32)
    keys = image_keys(SHA256[:6], seed=42)
    first = views_of(images, keys, 3)
    assert np.array_equal(first, views_of(images, image_keys(SHA256[:6], seed=42), 3))
    assert not np.allclose(first, images, atol=1e-3), "a view is augmented"
    assert not np.allclose(first, views_of(images, keys, 4), atol=1e-3)
    assert not np.allclose(first, views_of(images, image_keys(SHA256[:6], seed=43), 3), atol=1e-3)
    # A view belongs to the image (its sha256), not to its row: reordering the rows reorders the views.
    order = RNG.permutation(6)
    np.testing.assert_allclose(views_of(images[order], keys[order], 3), first[order], atol=1e-6)


def test_a_view_is_the_same_view_at_twice_the_resolution():
    """What lets a high-resolution teacher cache its logits of the very views the low-resolution student trains on."""
    large = _smooth_images(4, 64)
    small = large.reshape(4, 32, 2, 32, 2, 1).mean(axis=(2, 4))
    keys = image_keys(SHA256[:4], seed=0)
    for view in range(3):
        downsampled = views_of(large, keys, view).reshape(4, 32, 2, 32, 2, 1).mean(axis=(2, 4))
        np.testing.assert_allclose(downsampled, views_of(small, keys, view), atol=0.03)


def _pair(num_classes: int, size: int = 32) -> tuple[keras.Model, keras.Model]:
    keras.utils.set_random_seed(1)
    return build_teacher("resnet:S", size, num_classes, seed=1), build_student("tiny", size, num_classes, seed=2)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_cached_and_online_teachers_give_the_same_loss_on_the_same_view(num_classes):
    teacher, student = _pair(num_classes)
    images = RNG.normal(size=(8, 32, 32, 1)).astype(np.float32)
    labels, weights = RNG.integers(0, num_classes, 8), RNG.uniform(0.5, 2.0, 8).astype(np.float32)
    keys = image_keys(SHA256[:8], seed=7)
    cached_logits = view_logits(teacher, images, keys, views=3)  # what a teacher run caches
    view = views_of(images, keys, 2)
    y_pred = student(view, training=False)

    online = Distiller(student, teacher, temperature=3.0, alpha=0.3, binary=num_classes == 2)
    cached = Distiller(student, None, temperature=3.0, alpha=0.3, binary=num_classes == 2)
    online_loss = online.compute_loss({"image": view}, labels, y_pred, weights)
    cached_loss = cached.compute_loss({"image": view, "teacher_logits": cached_logits[:, 2]}, labels, y_pred, weights)
    np.testing.assert_allclose(online_loss, cached_loss, rtol=1e-5)
    other_view = cached.compute_loss({"image": view, "teacher_logits": cached_logits[:, 0]}, labels, y_pred, weights)
    assert not np.isclose(float(other_view), float(cached_loss), rtol=1e-4), "another view's logits give another loss"


def test_each_consistent_training_image_is_a_cached_view_with_the_teachers_logits_of_that_view():
    images = RNG.normal(size=(12, 32, 32, 1)).astype(np.float32)
    labels = np.arange(12) % 2
    keys = image_keys(SHA256, seed=5)
    views = 4
    logits = (100.0 * np.arange(12)[:, None] + np.arange(views)[None, :])[..., None].astype(np.float32)  # row r, view v: 100 r + v
    every_view = np.stack([views_of(images, keys, v) for v in range(views)], axis=1)
    dataset = make_dataset(images, labels, np.ones(12), logits, batch_size=5, shuffle=True, seed=3, view_keys=keys)
    seen = set()
    for _ in range(3):  # epochs: a new draw of views each time
        for features, batch_labels, _weights in dataset:
            assert set(features) == {"image", "teacher_logits"}, "cached views are not mixed: no mixup keys"
            for image, label, code in zip(features["image"].numpy(), batch_labels.numpy(), features["teacher_logits"].numpy()[:, 0]):
                row, view = divmod(int(round(code)), 100)
                assert label == labels[row]
                np.testing.assert_allclose(image, every_view[row, view], atol=1e-5)
                seen.add((row, view))
    assert len({view for _, view in seen}) > 1 and len({row for row, _ in seen}) == 12


def test_a_mixup_batch_mixes_the_hard_loss_by_the_weights_that_mixed_its_images():
    images = RNG.normal(size=(8, 32, 32, 1)).astype(np.float32)
    labels = np.arange(8) % 2
    (features, batch_labels, weights) = next(
        iter(make_dataset(images, labels, None, None, 8, view_keys=image_keys(SHA256[:8], 0), mix=True))
    )
    mix = features["mix"].numpy()
    assert ((mix >= 0) & (mix <= 1)).all() and not np.allclose(mix, 1.0)
    np.testing.assert_array_equal(features["mix_labels"].numpy(), batch_labels.numpy()[::-1])
    np.testing.assert_allclose(weights.numpy(), 1.0, atol=1e-6)  # equal class weights stay equal when mixed
    logits = RNG.normal(size=(8, 1)).astype(np.float32)
    per_label = [float(hard_loss(np.full(1, y), logits[i : i + 1], True)) for i, y in enumerate(batch_labels.numpy())]
    per_other = [float(hard_loss(np.full(1, y), logits[i : i + 1], True)) for i, y in enumerate(batch_labels.numpy()[::-1])]
    expected = np.mean(mix * np.array(per_label) + (1 - mix) * np.array(per_other))
    mixed = hard_loss(batch_labels, logits, True, None, features["mix_labels"], features["mix"])
    np.testing.assert_allclose(mixed, expected, rtol=1e-5)


def test_grad_cam_preprocesses_the_scan_at_each_models_own_input_size():
    """A registered student's teacher may work at another resolution: its Grad-CAM must not get the student's input."""
    scan = RNG.uniform(0, 255, (90, 70)).astype(np.float32)
    scan[30:50, 20:40] += 200.0
    keras.utils.set_random_seed(0)
    for model in (build_student("tiny", 32, 2, seed=0), build_teacher("hybrid:S", 64, 2, seed=0)):
        explanation = explain_scan(model, scan, ["normal", "tumor"], "tumor")
        assert explanation.heatmap.shape == scan.shape and np.isfinite(explanation.heatmap).all()
        expected = model_logits(model, preprocess(scan, model.input_shape[1])[None])
        assert explanation.probabilities["tumor"] == pytest.approx(float(1 / (1 + np.exp(-expected[0, 0]))), rel=1e-5)


def test_the_all_data_student_trains_consistently_on_the_cached_views_of_the_all_data_teacher(tmp_path):
    """What promotion's final student needs in consistent mode: train_on_all_data with the ``views_all`` logits."""
    cfg = tiny_config("", tmp_path, synthetic_images=40, epochs=1, kd_mode="consistent", kd_views=3)
    prepared = prepare_data(cfg)
    views = RNG.normal(size=(len(prepared.dataset.labels), 3, 1)).astype(np.float32)

    def build() -> Distiller:
        trainer = Distiller(build_student("tiny", cfg.image_size, 2, seed=0), None, cfg.temperature, 0.5, binary=True)
        trainer.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
        return trainer

    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        with mlflow.start_run() as run:
            student = train_on_all_data(prepared, cfg, build, views, 1, "student", consistent=True)
        metrics = mlflow.get_run(run.info.run_id).data.metrics
    assert math.isfinite(metrics["all_distillation_loss"]) and student.input_shape == (None, 32, 32, 1)


def _artifact_model(run_id: str, path: str) -> keras.Model:
    with tempfile.TemporaryDirectory() as tmp:
        return load_keras_model(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp))


@pytest.mark.slow
def test_a_teacher_at_twice_the_students_size_feeds_the_student_through_cached_logits(tmp_path):
    cfg = tiny_config(
        "", tmp_path, synthetic_images=40, epochs=1, teacher_arch="resnet:S", teacher_image_size=64, kd_views=2, experiment_name="sizes"
    )
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        run_id = distill(cfg)
        teacher_run_id = mlflow.get_run(run_id).data.tags["kd.teacher_run_id"]
        teachers = {name: load_teacher_model(teacher_run_id, name) for name in ("fold_0", "fold_1", "all")}
        students = [_artifact_model(run_id, f"models/student_fold_{k}.keras") for k in range(2)]
        prepared = prepare_data(cfg)
        sha256 = prepared.dataset.manifest["sha256"].to_numpy()
        order = np.random.default_rng(1).permutation(len(sha256))
        cached = load_teacher_logits(teacher_run_id, sha256[order])
    assert all(model.input_shape == (None, 64, 64, 1) for model in teachers.values())
    assert all(model.input_shape == (None, 32, 32, 1) for model in students) and prepared.images.shape[1:] == (32, 32, 1)
    # The cached logits are the teachers' own at 64 pixels, found by sha256 whatever order the rows are asked in.
    large = load_images(prepared.dataset, 64, cfg.cache_dir)
    for name, model in teachers.items():
        np.testing.assert_allclose(cached[name], model_logits(model, large[order]), rtol=1e-4, atol=1e-5)
    assert not any(name.startswith("views_") for name in cached), "a standard-mode teacher spends no time on views"


@pytest.mark.slow
def test_a_consistent_distill_run_trains_end_to_end_with_cached_views_and_with_an_online_teacher(tmp_path):
    cfg = tiny_config("", tmp_path, synthetic_images=40, epochs=1, teacher_arch="resnet:S", kd_mode="consistent", kd_views=2)
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        runs = {mode: mlflow.get_run(distill(cfg.replace(teacher_mode=mode))) for mode in ("cached", "online")}
    teacher_runs = {run.data.tags["kd.teacher_run_id"] for run in runs.values()}
    assert len(teacher_runs) == 1, "the online student reuses the teachers the cached one trained"
    for mode, run in runs.items():
        assert run.data.params["kd_mode"] == "consistent" and run.data.params["teacher_mode"] == mode
        assert all(math.isfinite(run.data.metrics[name]) for name in ("f1_mean", "fold_0_distillation_loss", "fold_1_student_loss"))


def test_the_no_kd_twin_of_a_cached_consistent_student_trains_as_an_augmented_student_without_mixup(tmp_path):
    """Its KD student's cached views are never mixed, so neither are the twin's: it trains exactly as a standard-mode
    student with augmentation (the same fresh views), and only the twin of an online consistent student is mixed."""
    cfg = tiny_config("", tmp_path, synthetic_images=40, epochs=2, augment=True, kd_views=2, no_kd=True)
    prepared = prepare_data(cfg)
    consistent = {"kd_mode": "consistent"}
    settings = {"cached twin": consistent, "augmented": {}, "online twin": {**consistent, "teacher_mode": "online"}}
    trained = {}
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):  # each fold logs its metrics to a run
        for name, changes in settings.items():
            with mlflow.start_run():
                trained[name] = cross_validate_student(cfg.replace(**changes), prepared, None, [0])
    cached_twin, augmented, online_twin = (trained[name] for name in settings)
    for twin_weights, plain_weights in zip(cached_twin.models[0].get_weights(), augmented.models[0].get_weights()):
        np.testing.assert_array_equal(twin_weights, plain_weights)
    assert not all(np.array_equal(a, b) for a, b in zip(online_twin.models[0].get_weights(), augmented.models[0].get_weights()))
    assert (mixes_views(cfg.replace(kd_mode="consistent", teacher_mode="online")), mixes_views(cfg.replace(kd_mode="consistent"))) == (
        True,
        False,
    )


def test_one_no_kd_twin_serves_every_teacher_while_kd_students_of_other_teachers_differ():
    kd = Config(teacher_arch="resnet", alpha=0.5)
    other_teacher = kd.replace(teacher_arch="hybrid:S", teacher_image_size=128)
    assert step_key(kd, distill_params(kd)) != step_key(other_teacher, distill_params(other_teacher))
    twin, other_twin = kd.replace(no_kd=True), other_teacher.replace(no_kd=True)
    assert step_key(twin, distill_params(twin)) == step_key(other_twin, distill_params(other_twin))
    other_setting = twin.replace(alpha=0.25, temperature=2.0)
    assert step_key(twin, distill_params(twin)) == step_key(other_setting, distill_params(other_setting)), "no_kd overrides alpha"
    assert step_key(twin, distill_params(twin)) != step_key(twin.replace(student_size="tiny"), distill_params(twin))
