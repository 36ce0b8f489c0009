"""Model-builder tests: sizes are what their names promise, outputs have the right shape, bad names fail clearly."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config import PipelineError
from pipelines.models import STUDENT_PRESETS, build_student, build_teacher, parse_student_size


def test_student_presets_grow_in_size_and_stay_far_below_the_teacher():
    counts = [build_student(name, 64, 2).count_params() for name in ("tiny", "small", "medium", "large")]
    assert counts == sorted(counts) and len(set(counts)) == 4
    teacher = build_teacher("resnet", 64, 2).count_params()
    assert teacher >= 20 * counts[1]  # the default student ("small") is 20x smaller or more


@pytest.mark.parametrize("size, expected", [("small", STUDENT_PRESETS["small"]), ("24x3", (24, 3)), (" 8x1 ", (8, 1))])
def test_student_size_accepts_presets_and_width_x_depth(size, expected):
    assert parse_student_size(size) == expected


@pytest.mark.parametrize("size", ["huge", "0x3", "16x9", "16", ""])
def test_bad_student_size_names_the_value(size):
    with pytest.raises(PipelineError, match="student_size"):
        parse_student_size(size)


@pytest.mark.parametrize("num_classes, units", [(2, 1), (3, 3), (4, 4)])
def test_binary_gets_one_logit_and_multiclass_one_per_class(num_classes, units):
    images = np.zeros((2, 32, 32, 1), dtype=np.float32)
    assert build_student("tiny", 32, num_classes)(images).shape == (2, units)
    assert build_teacher("resnet", 32, num_classes)(images).shape == (2, units)


def test_keras_application_teacher_is_built_without_downloading():
    model = build_teacher("MobileNetV2", 32, 2)
    assert model(np.zeros((1, 32, 32, 1), dtype=np.float32)).shape == (1, 1)


def test_keras_application_teacher_loads_a_local_weights_file(tmp_path):
    first = build_teacher("MobileNetV2", 32, 3, seed=1)
    backbone = next(layer for layer in first.layers if layer.name.startswith("mobilenet"))
    weights = tmp_path / "backbone.weights.h5"
    backbone.save_weights(weights)
    second = build_teacher("MobileNetV2", 32, 3, weights=str(weights), seed=2)
    loaded = next(layer for layer in second.layers if layer.name.startswith("mobilenet"))
    for a, b in zip(backbone.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "arch, weights, match",
    [("NoSuchNet", "", "teacher_arch"), ("MobileNetV2", "/no/such/file.h5", "teacher_weights"), ("resnet", "x.h5", "teacher_weights")],
)
def test_bad_teacher_settings_fail_clearly(arch, weights, match):
    with pytest.raises(PipelineError, match=match):
        build_teacher(arch, 32, 2, weights=weights)
