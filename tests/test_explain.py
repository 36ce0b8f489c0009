"""Grad-CAM on real, quickly trained models: maps have the scan's shape, are finite, lie in [0, 1], explain the
score exactly (the map sums to the logit minus its bias), and point at the synthetic lesions, whose positions the
generator writes to lesions.csv (the "pointing game"), for the student and for the teacher."""

from __future__ import annotations

import csv
from pathlib import Path

import keras
import numpy as np
import pytest

from pipelines.config import Config, PipelineError
from pipelines.data.images import decode_image, head_box, preprocess
from pipelines.evaluation.metrics import classification_metrics, probabilities
from pipelines.models.builders import build_student, build_teacher
from pipelines.models.distiller import Distiller
from pipelines.steps.prepare import prepare_data
from pipelines.training.fit import class_weights, make_dataset, optimizer, set_seed
from registry.explain import (
    MIN_MAP_CELLS,
    Explanation,
    caption,
    class_activation,
    describe,
    explain_scan,
    explained_map,
    gradcam,
    onto_scan,
    overlay,
    target_layer,
)

pytestmark = pytest.mark.slow
IMAGE_SIZE = 64
# The pointing game's tolerance: the lesion's box grown by one cell of the 8 x 8 feature map the heat map is
# computed on (64 px input / 8), in pixels of the 128 px scans; a peak cannot be placed more finely than that.
CELL = 128 // 8


@pytest.fixture(scope="module")
def lesion_models(tmp_path_factory):
    """A student and a teacher trained on 180 synthetic slices at 64 px (60 held out); a few minutes on 2 busy cores."""
    cfg = Config(
        data_dir="",
        synthetic_images=240,
        image_size=IMAGE_SIZE,
        folds=2,
        test_fraction=0.25,
        cache_dir=str(tmp_path_factory.mktemp("synthetic")),
    )
    prepared = prepare_data(cfg)
    labels, train = prepared.dataset.labels, prepared.splits.train
    weights = class_weights(labels[train], prepared.dataset.num_classes)[labels[train]]
    models = {}
    # The teacher's last epoch at a constant 3e-3 landed anywhere between hold-out AUC 0.74 and 0.83 (seeds, machines);
    # decayed to 0 from 1e-3 by a cosine it ends where it converged (0.79-0.89 over 4 seeds).
    for who, build, epochs, schedule in (
        ("student", lambda: build_student("small", IMAGE_SIZE, 2, seed=0), 15, dict(learning_rate=3e-3)),
        ("teacher", lambda: build_teacher("resnet", IMAGE_SIZE, 2, seed=0), 20, dict(learning_rate=1e-3, lr_schedule="cosine")),
    ):
        set_seed(0)
        network = build()
        trainer = Distiller(network, None, temperature=1.0, alpha=1.0, binary=True)
        # Each model its own pipeline: a shared one would go on reshuffling where the student's epochs left it.
        batches = make_dataset(prepared.images[train], labels[train], weights, batch_size=16, shuffle=True, seed=0)
        trainer.compile(optimizer=optimizer(cfg.replace(batch_size=16, **schedule), int(batches.cardinality()), epochs))
        trainer.fit(batches, epochs=epochs, shuffle=False, verbose=0)
        models[who] = network
    return models, prepared


def lesion_rows(prepared) -> list[tuple[int, Path, float, float, float]]:
    """Hold-out tumour scans: (row, path, lesion centre x, y, radius) in pixels of the scan as written."""
    root = prepared.dataset.root
    with open(root / "lesions.csv", newline="") as handle:
        lesions = {row["file"]: row for row in csv.DictReader(handle)}
    rows = []
    for row in prepared.splits.test:
        path = Path(prepared.dataset.manifest["path"].iloc[row])
        lesion = lesions[path.relative_to(root).as_posix()]
        if lesion["cx"]:
            rows.append((row, path, float(lesion["cx"]), float(lesion["cy"]), float(lesion["radius"])))
    return rows


def peak_in_box(heatmap: np.ndarray, cx: float, cy: float, half_width: float) -> bool:
    y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    return abs(x - cx) <= half_width and abs(y - cy) <= half_width


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_the_tumour_map_points_at_the_lesion_and_the_normal_map_does_not(lesion_models, who):
    models, prepared = lesion_models
    model, test, names = models[who], prepared.splits.test, prepared.dataset.class_names
    probs = probabilities(np.asarray(model(prepared.images[test], training=False)), True)
    metrics = classification_metrics(prepared.dataset.labels[test], probs)
    assert metrics["roc_auc"] > 0.75, f"the {who} did not learn the lesions ({metrics}); the pointing game would mean nothing"

    hits, normal_on_lesion, true_positives = 0, 0, 0
    for _row, path, cx, cy, radius in lesion_rows(prepared):
        scan = decode_image(path)
        tumour = explain_scan(model, scan, names, "tumor")
        if tumour.predicted != "tumor":
            continue
        true_positives += 1
        assert tumour.heatmap.shape == scan.shape and np.all(np.isfinite(tumour.heatmap))
        assert tumour.heatmap.min() >= 0.0 and tumour.heatmap.max() <= 1.0
        assert not tumour.empty, (
            f"{path.name}: the {who} predicts tumour (p={tumour.probabilities['tumor']:.2f}) but no region raises the tumour score"
        )
        hits += peak_in_box(tumour.heatmap, cx, cy, radius + CELL)
        normal = explain_scan(model, scan, names, "normal")
        y, x = np.unravel_index(np.argmax(normal.heatmap), scan.shape)
        normal_on_lesion += not normal.empty and np.hypot(x - cx, y - cy) <= radius  # on the lesion itself
    assert true_positives >= 15, f"only {true_positives} true positives of the {who}"
    print(f"{who}: pointing game {hits}/{true_positives}; normal map peaks on the lesion in {normal_on_lesion}")
    assert hits >= 0.8 * true_positives, f"the {who}'s tumour map peaks on the lesion in {hits} of {true_positives} true positives"
    assert normal_on_lesion <= 0.2 * true_positives, (
        f"the {who}'s normal map peaks on the lesion in {normal_on_lesion} of {true_positives} true positives"
    )


def test_the_map_sums_to_the_score_and_the_two_classes_of_one_logit_are_opposite():
    image = preprocess(np.random.default_rng(1).uniform(0, 255, (80, 60)).astype(np.float32), 32)
    for model in (build_teacher("resnet", 32, 2, seed=0), build_student("tiny", 32, 2, seed=0)):
        model.get_layer("logits").bias.assign([0.3])
        z = float(np.asarray(model(image[None], training=False))[0, 0])
        tumour, normal = class_activation(model, image, 1, final=True), class_activation(model, image, 0, final=True)
        assert tumour.sum() == pytest.approx(z - 0.3, abs=1e-4), model.name
        np.testing.assert_allclose(normal, -tumour, atol=1e-6)


def test_an_empty_map_is_reported_and_not_drawn():
    scan = np.full((40, 40), 50.0, dtype=np.float32)
    empty = Explanation(scan, np.zeros_like(scan), "tumor", {"normal": 0.2, "tumor": 0.8})
    assert empty.empty and "zero everywhere" in describe(empty, "student") and "all zero, not drawn" in caption(empty, "student")
    drawn = Explanation(scan, np.pad(np.ones((10, 10), np.float32), 15), "tumor", {"normal": 0.2, "tumor": 0.8})
    assert not drawn.empty and "zero" not in describe(drawn, "student") + caption(drawn, "student")


def test_heatmap_maps_back_through_crop_and_padding():
    scan = np.zeros((90, 140), dtype=np.float32)
    scan[20:70, 30:120] = 100.0  # a wide "head" in a dark frame
    rows, cols = head_box(scan)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (20, 70, 30, 120)
    on_input = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    on_input[:, IMAGE_SIZE // 2 :] = 1.0  # the right half of the model's input
    mapped = onto_scan(on_input, scan)
    assert mapped.shape == scan.shape
    assert mapped[:, :30].max() == 0.0 and mapped[:20].max() == 0.0, "nothing outside the head box"
    assert mapped[45, 110] == pytest.approx(1.0) and mapped[45, 40] == pytest.approx(0.0), "left stays left, right stays right"
    image = overlay(scan, mapped)
    assert image.shape == (*scan.shape, 3) and image.dtype == np.uint8


def test_gradcam_of_the_teacher_and_untrained_models_is_well_formed():
    image = preprocess(np.random.default_rng(0).uniform(0, 255, (80, 60)).astype(np.float32), 32)
    for model in (build_teacher("resnet", 32, 2, seed=0), build_student("tiny", 32, 3, seed=0)):
        for class_index in range(max(2, model.output.shape[-1])):
            cam = gradcam(model, image, class_index)
            assert cam.shape == (32, 32) and np.all(np.isfinite(cam)) and cam.min() >= 0.0 and cam.max() <= 1.0
    teacher = build_teacher("resnet", 32, 2)
    assert isinstance(target_layer(teacher), (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D))
    assert target_layer(teacher).input.shape[1:] == teacher.get_layer("stage4_relu").output.shape[1:], "the last residual stage's map"


def test_the_map_explained_is_the_deepest_at_least_16_cells_wide_or_the_last_when_it_is():
    image = preprocess(np.random.default_rng(2).uniform(0, 255, (80, 60)).astype(np.float32), 32)
    cases = {  # (model, input size): the layer whose output is explained
        ("small", 32): "block2_relu",  # last map 4x4 after its pooling: the 16x16 map two blocks up
        ("small", 64): "block3_relu",  # last map 8x8: the same block's map before its pooling
        ("small", 128): "block3_pool",  # last map 16x16: the last map itself
        ("resnet", 32): "stage2_relu",
        ("resnet", 128): "stage4_relu",
    }
    for (name, size), expected in cases.items():
        model = build_student(name, size, 2, seed=0) if name == "small" else build_teacher(name, size, 2, seed=0)
        explained = explained_map(model)
        assert explained._keras_history.operation.name == expected, (name, size)
        assert explained.shape[1] >= MIN_MAP_CELLS
        assert explained_map(model, final=True) is target_layer(model).input
    assert class_activation(build_student("small", 32, 2, seed=0), image, 1).shape == (16, 16)


def test_models_without_top_level_convolutions_are_refused():
    inputs = keras.Input((32, 32, 1))
    dense = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(inputs)))
    with pytest.raises(PipelineError, match="no global pooling over a convolutional feature map"):
        target_layer(dense)


def test_unknown_class_is_refused(lesion_models):
    models, prepared = lesion_models
    scan = decode_image(Path(prepared.dataset.manifest["path"].iloc[0]))
    with pytest.raises(PipelineError, match="not one of the model's classes"):
        explain_scan(models["student"], scan, prepared.dataset.class_names, "glioma")
