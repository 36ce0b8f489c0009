"""Grad-CAM on a real, quickly trained student: maps have the scan's shape, are finite, lie in [0, 1] and
light up the synthetic lesions (whose positions the generator writes to lesions.csv) more than the brain
around them."""

from __future__ import annotations

import csv
from pathlib import Path

import keras
import numpy as np
import pytest

from pipelines.config import Config, PipelineError
from pipelines.data import decode_image, head_box, preprocess
from pipelines.distiller import Distiller
from pipelines.evaluate import classification_metrics, probabilities
from pipelines.models import build_student, build_teacher
from pipelines.prepare import prepare_data
from pipelines.training import class_weights, make_dataset, set_seed
from registry.explain import explain_scan, gradcam, onto_scan, overlay, target_layer

pytestmark = pytest.mark.slow
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def lesion_student(tmp_path_factory):
    """A small student trained on the embedded synthetic set (300 slices, 64 px, 30 epochs: about a minute on 2 cores)."""
    cfg = Config(data_dir="", synthetic_images=300, image_size=IMAGE_SIZE, folds=2, cache_dir=str(tmp_path_factory.mktemp("synthetic")))
    prepared = prepare_data(cfg)
    labels, train = prepared.dataset.labels, prepared.splits.train
    set_seed(0)
    student = build_student("small", IMAGE_SIZE, prepared.dataset.num_classes, seed=0)
    trainer = Distiller(student, None, temperature=1.0, alpha=1.0, binary=True)
    trainer.compile(optimizer=keras.optimizers.Adam(3e-3))
    weights = class_weights(labels[train], prepared.dataset.num_classes)[labels[train]]
    trainer.fit(make_dataset(prepared.images[train], labels[train], weights, batch_size=16, shuffle=True, seed=0), epochs=30, shuffle=False, verbose=0)  # make_dataset shuffles
    return student, prepared


def lesion_rows(prepared) -> list[tuple[Path, float, float, float]]:
    """Hold-out tumour scans with their lesion centre and radius (pixels of the scan as written)."""
    root = prepared.dataset.root
    with open(root / "lesions.csv", newline="") as handle:
        lesions = {row["file"]: row for row in csv.DictReader(handle)}
    rows = []
    for path in prepared.dataset.manifest["path"].to_numpy()[prepared.splits.test]:
        lesion = lesions[Path(path).relative_to(root).as_posix()]
        if lesion["cx"]:
            rows.append((Path(path), float(lesion["cx"]), float(lesion["cy"]), float(lesion["radius"])))
    return rows


def test_gradcam_highlights_synthetic_lesions(lesion_student):
    student, prepared = lesion_student
    test = prepared.splits.test
    metrics = classification_metrics(prepared.dataset.labels[test], probabilities(np.asarray(student(prepared.images[test])), True))
    assert metrics["roc_auc"] > 0.8, f"the student did not learn the lesions ({metrics}); the Grad-CAM check below would mean nothing"

    ratios = []
    for path, cx, cy, radius in lesion_rows(prepared):
        scan = decode_image(path)
        explanation = explain_scan(student, scan, IMAGE_SIZE, prepared.dataset.class_names, "tumor")
        heatmap = explanation.heatmap
        assert heatmap.shape == scan.shape and np.all(np.isfinite(heatmap))
        assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
        ys, xs = np.mgrid[: scan.shape[0], : scan.shape[1]]
        distance = np.hypot(xs - cx, ys - cy)
        brain = scan > scan.mean()  # the head, not the dark background
        lesion, elsewhere = heatmap[distance <= radius].mean(), heatmap[(distance > 2 * radius) & brain].mean()
        ratios.append(lesion / max(elsewhere, 1e-6))
    ratios = np.array(ratios)
    assert len(ratios) >= 20
    assert np.mean(ratios > 1.0) >= 0.75, f"lesion brighter than the rest of the brain in only {np.mean(ratios > 1):.0%} of {len(ratios)} scans"
    assert np.median(ratios) > 2.0, f"median lesion/brain heat ratio {np.median(ratios):.2f}"


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
    assert type(target_layer(build_teacher("resnet", 32, 2))).__name__ == "ReLU"


def test_models_without_top_level_convolutions_are_refused():
    inputs = keras.Input((32, 32, 1))
    dense = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(inputs)))
    with pytest.raises(PipelineError, match="no convolution"):
        target_layer(dense)


def test_unknown_class_is_refused(lesion_student):
    student, prepared = lesion_student
    scan = decode_image(Path(prepared.dataset.manifest["path"].iloc[0]))
    with pytest.raises(PipelineError, match="not one of the model's classes"):
        explain_scan(student, scan, IMAGE_SIZE, prepared.dataset.class_names, "glioma")
