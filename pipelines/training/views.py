"""Consistent distillation (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and consistent"):
teacher and student see the same augmented view of an image on every step.

A view is a pure function of (image, seed pair): a left-right flip, a small rotation, zoom and shift (fractions of the
image, so a view means the same thing at any resolution: a teacher at twice the student's size sees the same view)
and a contrast change, the changes of :func:`pipelines.training.fit.augmentation`. The seed pair is (image key, view):
the image key comes from the run's seed and the image's sha256, so a view of an image is the same in the teacher
run, which caches its logits of views 0..kd_views-1, and in any student run that reads them, whatever the row order.

- cached: each training step gives the student one of the ``kd_views`` cached views of each image, with the
  teacher's logits of that very view. No mixup: the logits of a mix of two images cannot be cached.
- online: a fresh view every step, then mixup within the batch; the teacher runs on that exact batch.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import tensorflow as tf

# The ranges of pipelines.training.fit.augmentation: rotation in turns, zoom and shift as fractions, contrast factor.
ROTATION, ZOOM, SHIFT, CONTRAST = 0.04, 0.1, 0.05, 0.2
# Beta(a, a) mixup weights; a small a keeps most mixes close to one image (Zhang et al. 2018 use 0.2-0.4).
MIXUP_ALPHA = 0.2


def image_keys(sha256: np.ndarray, seed: int) -> np.ndarray:
    """One int64 per image, from the run's seed and the image's sha256: the first half of its views' seed pairs."""
    return np.array([int(hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()[:15], 16) for digest in sha256], dtype=np.int64)


def augmented_view(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """The view of one ``(S, S, 1)`` image that the ``seed`` pair (int64) names: the same seed gives the same view."""
    draws = tf.random.stateless_uniform([6], seed=seed, minval=-1.0, maxval=1.0)
    image = tf.where(draws[0] < 0.0, tf.image.flip_left_right(image), image)
    size = tf.cast(tf.shape(image)[0], tf.float32)
    angle, scale = draws[1] * ROTATION * 2.0 * math.pi, 1.0 + draws[2] * ZOOM
    shift_x, shift_y = draws[3] * SHIFT * size, draws[4] * SHIFT * size
    # Output pixel -> input pixel: rotate and scale about the centre, then shift (ImageProjectiveTransformV3's convention).
    centre = (size - 1.0) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    transform = tf.stack(
        [
            cos,
            -sin,
            centre - cos * centre + sin * centre - shift_x,
            sin,
            cos,
            centre - sin * centre - cos * centre - shift_y,
            0.0,
            0.0,
        ]
    )
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform[None],
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",  # images are z-scored: the nearest (background) pixel, not 0, which is mid-grey here
    )[0]
    mean = tf.reduce_mean(moved)
    return (moved - mean) * (1.0 + draws[5] * CONTRAST) + mean


def view_batches(images: np.ndarray, keys: np.ndarray, view: int, batch_size: int) -> tf.data.Dataset:
    """View ``view`` of every image (``keys`` from :func:`image_keys`) in batches, made on every core by tf.data as the
    students' input pipeline makes its views: the same graph, so the same pixels. Eagerly, ``map_fn`` ran
    :func:`augmented_view`'s ops one image at a time from Python, and a consistent teacher spent minutes per fold
    caching its views."""
    seeds = np.stack([keys, np.full_like(keys, view)], axis=1)
    pairs = tf.data.Dataset.from_tensor_slices((np.asarray(images, np.float32), seeds))
    return pairs.map(augmented_view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(max(batch_size, 1))


def views_of(images: np.ndarray, keys: np.ndarray, view: int) -> np.ndarray:
    """View ``view`` of every image, as one array."""
    return next(iter(view_batches(images, keys, view, len(images)))).numpy()


def view_logits(model, images: np.ndarray, keys: np.ndarray, views: int, batch_size: int = 64) -> np.ndarray:
    """The model's logits of views ``0..views-1`` of every image: ``(N, views, units)``, what a teacher run caches.

    The views reach the model a batch at a time, never all at once."""
    from pipelines.evaluation.metrics import model_logits

    per_view = [
        np.concatenate([model_logits(model, batch.numpy(), batch_size) for batch in view_batches(images, keys, view, batch_size)])
        for view in range(views)
    ]
    return np.stack(per_view, axis=1)


def pick_view(features: dict, draw: tf.Tensor) -> dict:
    """One element's training view, from a random int64 ``draw``: with cached view logits ``(views, units)``, view
    ``draw mod views`` and the teacher's logits of it; else a fresh view (view ``draw``: not a cached one but for
    odds of kd_views in 2**64)."""
    features = dict(features)
    key = features.pop("view_key")
    if "teacher_logits" in features and len(features["teacher_logits"].shape) == 2:
        view = draw % tf.cast(tf.shape(features["teacher_logits"])[0], tf.int64)
        features["teacher_logits"] = tf.gather(features["teacher_logits"], view)
    else:
        view = draw
    features["image"] = augmented_view(features["image"], tf.stack([key, view]))
    return features


def mixup(features: dict, labels: tf.Tensor, weights: tf.Tensor, seed: tf.Tensor) -> tuple:
    """Mix each image of a batch with the batch's reverse, by Beta(a, a) weights; the hard loss mixes the labels alike.

    The mix goes in as ``mix_labels`` (the other image's label) and ``mix`` (the weight of the image's own label),
    so the Distiller mixes the two cross-entropies, and the class weights are mixed by the same weights.
    """
    count = tf.shape(labels)[0]
    gammas = tf.random.stateless_gamma([2, count], seed=tf.stack([seed, seed + 1]), alpha=MIXUP_ALPHA)
    mix = gammas[0] / tf.maximum(gammas[0] + gammas[1], 1e-12)
    image_mix = tf.reshape(mix, (-1, 1, 1, 1))
    features = {
        **features,
        "image": image_mix * features["image"] + (1.0 - image_mix) * tf.reverse(features["image"], [0]),
        "mix_labels": tf.reverse(labels, [0]),
        "mix": mix,
    }
    return features, labels, mix * weights + (1.0 - mix) * tf.reverse(weights, [0])
