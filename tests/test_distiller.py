"""Model tests for the Distiller: the loss is the equation, the binary variant equals softmax, modes agree."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipelines.models.builders import build_student, build_teacher
from pipelines.models.distiller import Distiller, hard_loss, soft_loss

RNG = np.random.default_rng(0)


def _two_class(z: np.ndarray) -> np.ndarray:
    """The single logit z as two-class softmax logits [0, z]."""
    return np.stack([np.zeros_like(z), z], axis=1)


@pytest.mark.parametrize("temperature", [1.0, 2.5, 7.0])
def test_binary_single_logit_loss_equals_two_class_softmax(temperature):
    z_student = RNG.normal(0, 3, 64).astype(np.float32)
    z_teacher = RNG.normal(0, 3, 64).astype(np.float32)
    labels = RNG.integers(0, 2, 64)
    weights = RNG.uniform(0.5, 2.0, 64).astype(np.float32)

    binary_hard = hard_loss(labels, z_student[:, None], binary=True, sample_weight=weights)
    softmax_hard = hard_loss(labels, _two_class(z_student), binary=False, sample_weight=weights)
    np.testing.assert_allclose(binary_hard, softmax_hard, rtol=1e-5)

    binary_soft = soft_loss(z_teacher[:, None], z_student[:, None], temperature, binary=True, sample_weight=weights)
    softmax_soft = soft_loss(_two_class(z_teacher), _two_class(z_student), temperature, binary=False, sample_weight=weights)
    np.testing.assert_allclose(binary_soft, softmax_soft, rtol=1e-4, atol=1e-6)


def test_soft_loss_is_t_squared_kl_and_zero_when_student_matches_teacher():
    teacher = RNG.normal(0, 2, (16, 3)).astype(np.float32)
    student = RNG.normal(0, 2, (16, 3)).astype(np.float32)
    temperature = 4.0
    p_t = tf.nn.softmax(teacher / temperature).numpy()
    p_s = tf.nn.softmax(student / temperature).numpy()
    expected = temperature**2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    np.testing.assert_allclose(soft_loss(teacher, student, temperature, binary=False), expected, rtol=1e-5)
    assert float(soft_loss(teacher, teacher, temperature, binary=False)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_loss(teacher[:, :1], teacher[:, :1], temperature, binary=True)) == pytest.approx(0.0, abs=1e-6)


def test_binary_losses_are_stable_for_extreme_logits():
    z = np.array([[-200.0], [200.0], [0.0]], dtype=np.float32)
    labels = np.array([0, 1, 1])
    assert np.isfinite(float(hard_loss(labels, z, binary=True)))
    assert np.isfinite(float(soft_loss(-z, z, 1.0, binary=True)))


def _distiller_pair(num_classes: int):
    keras.utils.set_random_seed(1)
    teacher = build_teacher("resnet", 32, num_classes, seed=1)
    student = build_student("tiny", 32, num_classes, seed=2)
    return teacher, student


@pytest.mark.parametrize("num_classes", [2, 3])
def test_cached_and_online_teacher_give_the_same_loss_on_the_same_batch(num_classes):
    teacher, student = _distiller_pair(num_classes)
    images = RNG.normal(size=(8, 32, 32, 1)).astype(np.float32)
    labels = RNG.integers(0, num_classes, 8)
    weights = RNG.uniform(0.5, 2.0, 8).astype(np.float32)
    cached_logits = teacher.predict(images, verbose=0)

    online = Distiller(student, teacher, temperature=3.0, alpha=0.3, binary=num_classes == 2)
    cached = Distiller(student, None, temperature=3.0, alpha=0.3, binary=num_classes == 2)
    y_pred = student(images, training=False)
    online_loss = online.compute_loss({"image": images}, labels, y_pred, weights)
    cached_loss = cached.compute_loss({"image": images, "teacher_logits": cached_logits}, labels, y_pred, weights)
    np.testing.assert_allclose(online_loss, cached_loss, rtol=1e-5)


def test_loss_is_alpha_weighted_sum_of_hard_and_soft_terms():
    teacher, student = _distiller_pair(2)
    images = RNG.normal(size=(8, 32, 32, 1)).astype(np.float32)
    labels = RNG.integers(0, 2, 8)
    teacher_logits = teacher.predict(images, verbose=0)
    y_pred = student(images, training=False)
    hard = float(hard_loss(labels, y_pred, binary=True))
    soft = float(soft_loss(teacher_logits, y_pred, 4.0, binary=True))
    for alpha in (0.0, 0.25, 1.0):
        distiller = Distiller(student, None, temperature=4.0, alpha=alpha, binary=True)
        loss = distiller.compute_loss({"image": images, "teacher_logits": teacher_logits}, labels, y_pred)
        assert float(loss) == pytest.approx(alpha * hard + (1 - alpha) * soft, rel=1e-5)


def test_training_updates_the_student_only():
    teacher, student = _distiller_pair(2)
    teacher_before = [w.copy() for w in teacher.get_weights()]
    student_before = [w.copy() for w in student.get_weights()]
    distiller = Distiller(student, teacher, temperature=2.0, alpha=0.5, binary=True)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    images = RNG.normal(size=(16, 32, 32, 1)).astype(np.float32)
    labels = RNG.integers(0, 2, 16)
    history = distiller.fit({"image": images}, labels, epochs=2, batch_size=8, verbose=0)

    assert all(np.array_equal(a, b) for a, b in zip(teacher_before, teacher.get_weights())), "the teacher must stay frozen"
    assert any(not np.array_equal(a, b) for a, b in zip(student_before, student.get_weights())), "the student must learn"
    assert distiller.trainable_weights and all(any(w is s for s in student.trainable_weights) for w in distiller.trainable_weights)
    for name in ("loss", "student_loss", "distillation_loss", "accuracy", "precision", "recall", "auc"):
        assert name in history.history
    assert history.history["distillation_loss"][0] > 0


def test_alpha_one_never_consults_the_teacher():
    _, student = _distiller_pair(2)
    distiller = Distiller(student, None, temperature=2.0, alpha=1.0, binary=True)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
    images = RNG.normal(size=(8, 32, 32, 1)).astype(np.float32)
    history = distiller.fit({"image": images}, RNG.integers(0, 2, 8), epochs=1, verbose=0)
    assert "distillation_loss" not in history.history and "student_loss" not in history.history, "one loss, logged once as loss"
    assert {"loss", "accuracy", "auc"} <= set(history.history)
