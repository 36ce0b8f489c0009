"""Model-builder tests: sizes are what their names promise, outputs have the right shape, bad names fail clearly."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipelines.config import Config, PipelineError
from pipelines.models.builders import STUDENT_PRESETS, GroupNorm, build_student, build_teacher, load_keras_model, parse_student_size
from registry.explain import class_activation, gradcam


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


@pytest.mark.parametrize("arch", ["resnet", "hybrid"])
def test_our_teachers_grow_from_size_s_to_l_and_m_is_the_default(arch):
    counts = {size: build_teacher(f"{arch}:{size}", 32, 2).count_params() for size in ("S", "M", "L")}
    assert counts["S"] < counts["M"] < counts["L"]
    assert build_teacher(arch, 32, 2).count_params() == counts["M"]


@pytest.mark.parametrize("spec", ["hybrid:XL", "resnet:", "MobileNetV2:S"])
def test_a_bad_teacher_size_is_refused_with_the_config(spec):
    with pytest.raises(PipelineError, match="teacher_arch"):
        Config(teacher_arch=spec)


def lesion_images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise slices, half with a bright square at a random place: a task any working model learns in a few steps."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.2, 0.05, (n, size, size, 1)).astype(np.float32)
    labels = np.arange(n) % 2
    for image, label in zip(images, labels):
        if label:
            row, col = rng.integers(0, size - 8, 2)
            image[row : row + 8, col : col + 8] = 1.0
    return images, labels.astype(np.float32)


def _outputs_and_gradients(layer: keras.layers.Layer, images, upstream) -> list[np.ndarray]:
    """The layer's output and the gradients of sum(output * upstream) with respect to the images, gamma and beta."""
    images = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(images)
        outputs = layer(images)
        loss = tf.reduce_sum(tf.cast(outputs, "float32") * upstream)
    return [np.asarray(value, dtype=np.float32) for value in [outputs, *tape.gradient(loss, [images, layer.gamma, layer.beta])]]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("offset", [0.0, 50.0], ids=["centred", "far-from-zero mean"])
def test_our_group_norm_computes_what_keras_group_normalization_computes_forward_and_backward(policy, offset):
    rng = np.random.default_rng(0)
    shape = (4, 8, 8, 24)
    images = (rng.normal(size=shape) * 3 + offset).astype(np.float32)
    upstream = rng.normal(size=shape).astype(np.float32)
    gamma, beta = rng.normal(size=24).astype(np.float32), rng.normal(size=24).astype(np.float32)
    results = []
    for layer_class in (GroupNorm, keras.layers.GroupNormalization):
        layer = layer_class(groups=8, dtype=policy)
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        results.append(_outputs_and_gradients(layer, images, upstream))
    tolerance = 1e-4 if policy == "float32" else 2e-2  # bfloat16 keeps 8 bits of mantissa
    for ours, keras_own, what in zip(*results, ("output", "image gradient", "gamma gradient", "beta gradient")):
        scale = np.abs(keras_own).max()
        np.testing.assert_allclose(ours / scale, keras_own / scale, atol=tolerance, err_msg=what)


def test_hybrid_teacher_learns_and_round_trips_through_safe_loading(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_teacher("hybrid:S", 32, 2)
    assert any(isinstance(layer, keras.layers.MultiHeadAttention) for layer in model.layers)
    images, labels = lesion_images(64, 32)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    history = model.fit(images, labels, epochs=6, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < 0.8 * history.history["loss"][0]
    path = tmp_path / "hybrid.keras"
    model.save(path)
    loaded = load_keras_model(path)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-5, atol=1e-5)


def test_hybrid_teacher_grad_cam_is_a_map_over_its_token_grid_that_sums_to_the_score():
    model = build_teacher("hybrid:S", 64, 2, seed=3)
    image = lesion_images(2, 64)[0][1]
    activation = class_activation(model, image, 1)
    assert activation.shape == (16, 16)  # the stem halves 64 px twice: a 16x16 grid of tokens
    logit = float(model(image[None], training=False)[0, 0])
    bias = float(model.get_layer("logits").bias.numpy()[0])
    assert activation.sum() == pytest.approx(logit - bias, rel=1e-3, abs=1e-4)
    assert gradcam(model, image, 1).shape == (64, 64)
