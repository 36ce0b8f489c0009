"""The pointing game on real tumour boxes (``../shared/data/br35h-boxes``): box files are read and checked, a point is
in the box grown by 15 px or not, and Grad-CAM of models trained on real scans beats the centre and the brightest
smoothed pixel on the same scans."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from pipelines.config import Config, PipelineError
from registry.pointing import BoxedScan, fractions, in_box, pointing_game, read_boxes, tumour_class

BOXES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "br35h-boxes"


def test_box_files_are_read_beside_their_scans_and_a_malformed_one_is_named(tmp_path):
    Image.new("L", (40, 20)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("0 0.5 0.25 0.2 0.5\n")
    Image.new("L", (40, 20)).save(tmp_path / "unboxed.png")  # no box file: not part of the game
    assert read_boxes(tmp_path) == [BoxedScan(tmp_path / "a.png", (0.5, 0.25, 0.2, 0.5))]
    (tmp_path / "b.txt").write_text("0 0.5 1.5 0.2\n")
    Image.new("L", (40, 20)).save(tmp_path / "b.png")
    with pytest.raises(PipelineError, match=r"b\.txt: expected one line 'class x_centre y_centre width height'"):
        read_boxes(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="holds no scan with a box file"):
        read_boxes(tmp_path / "empty")
    with pytest.raises(PipelineError, match="^boxes_dir="):
        Config(boxes_dir=str(tmp_path / "missing"))


def test_a_point_counts_inside_the_box_grown_by_the_tolerance_and_not_beyond():
    box, shape = (0.5, 0.5, 0.2, 0.1), (200, 100)  # 20 px wide, 20 px high, centred at (row 100, column 50)
    assert in_box((100, 50), box, shape, 15)
    assert in_box((100, 40 - 15), box, shape, 15) and not in_box((100, 40 - 16), box, shape, 15)
    assert in_box((110 + 15, 50), box, shape, 15) and not in_box((110 + 16, 50), box, shape, 15)


def test_the_tumour_class_is_the_positive_one_or_the_likeliest_tumour():
    assert tumour_class(["no", "yes"], {"no": 0.9, "yes": 0.1}) == "yes"
    four = ["glioma", "meningioma", "notumor", "pituitary"]
    assert tumour_class(four, {"glioma": 0.1, "meningioma": 0.3, "notumor": 0.5, "pituitary": 0.1}) == "meningioma"


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,  # the day both maps beat the brightest pixel, this turns red: drop the mark then
    reason=(
        "issue 24, measured on these scans: both maps beat the centre but not the brightest smoothed pixel (16x16 maps: "
        "student 0.775, teacher 0.815, brightest 0.84). At 64 px not the map's resolution (their last 8x8 maps scored the "
        "same; misses lie several cells from the box; at 32 px it was: registry.explain.MIN_MAP_CELLS); the misses are "
        "scans the model calls tumour-free and peaks on the scalp where the head crop puts it on the input's border"
    ),
)
def test_gradcam_of_models_trained_on_real_scans_beats_the_centre_and_the_brightest_pixel(real_data_dir, tmp_path_factory):
    """A student and a teacher trained on the 253 real yes/no scans at 64 px play the game on 200 Br35H scans with
    annotated boxes (another source: none of them is in the training set)."""
    if not BOXES_DIR.is_dir():
        pytest.skip(f"{BOXES_DIR} not found")
    from pipelines.models.builders import build_student, build_teacher
    from pipelines.models.distiller import Distiller
    from pipelines.steps.prepare import prepare_data
    from pipelines.training.fit import class_weights, make_dataset, set_seed

    cfg = Config(data_dir=str(real_data_dir), image_size=64, folds=2, cache_dir=str(tmp_path_factory.mktemp("cache")))
    prepared = prepare_data(cfg)
    labels, train = prepared.dataset.labels, prepared.splits.train
    weights = class_weights(labels[train], 2)[labels[train]]
    models = {}
    for who, build in (
        ("student", lambda: build_student("small", 64, 2, seed=0)),
        ("teacher", lambda: build_teacher("resnet", 64, 2, seed=0)),
    ):
        set_seed(0)
        models[who] = build()
        trainer = Distiller(models[who], None, temperature=1.0, alpha=1.0, binary=True)
        trainer.compile(optimizer=keras.optimizers.Adam(3e-3))
        trainer.fit(make_dataset(prepared.images[train], labels[train], weights, batch_size=16, shuffle=True, seed=0), epochs=30, verbose=0)
    table = pointing_game(models, prepared.dataset.class_names, read_boxes(BOXES_DIR)[:200])
    result = fractions(table)
    print(result)
    for who in ("student", "teacher"):
        score = result[f"pointing_game_{who}"]
        assert score > result["pointing_game_centre"] and score > result["pointing_game_brightest"], (who, result)
    assert np.isclose(result["pointing_game_scans"], 200)
