"""Knowledge distillation: a frozen teacher guides a trainable student.

    loss = alpha * hard_loss(y, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

Inputs are a dict: ``{"image": ...}`` with the teacher run on every step (``online``), or
``{"image": ..., "teacher_logits": ...}`` with logits computed once (``cached``); a mixup batch adds
``mix_labels`` and ``mix`` (pipelines/training/views.py) for the hard loss. Two classes use a
single logit z: the sigmoid is the two-class softmax of ``[0, z]``, so the binary losses below equal the
softmax ones on those logits (tested). Only the student is trained, evaluated and exported.
"""

from __future__ import annotations

import keras
from keras import ops


def hard_loss(labels, logits, binary: bool, sample_weight=None, mix_labels=None, mix=None):
    """Cross-entropy with the true labels, weighted per sample (class weights), averaged over the batch.

    A mixup batch (pipelines/training/views.py) gives each image's second label and the weight ``mix`` of its own: the
    cross-entropies with the two labels are mixed by those weights.
    """
    per_sample = _cross_entropy(labels, logits, binary)
    if mix is not None:
        mix = ops.cast(ops.reshape(mix, (-1,)), per_sample.dtype)
        per_sample = mix * per_sample + (1.0 - mix) * _cross_entropy(mix_labels, logits, binary)
    return _weighted_mean(per_sample, sample_weight)


def _cross_entropy(labels, logits, binary: bool):
    if binary:
        return _bce(labels, logits)
    return ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def _bce(labels, logits):
    labels = ops.cast(ops.reshape(labels, (-1,)), logits.dtype)
    logits = ops.reshape(logits, (-1,))
    # Stable form of -[y log s(z) + (1 - y) log(1 - s(z))].
    return ops.maximum(logits, 0.0) - logits * labels + ops.log1p(ops.exp(-ops.abs(logits)))


def soft_loss(teacher_logits, student_logits, temperature: float, binary: bool, sample_weight=None):
    """T^2 * KL(teacher_T || student_T): Bernoulli KL for one logit, categorical KL otherwise.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard ones when T changes.
    """
    teacher_logits = ops.cast(teacher_logits, student_logits.dtype) / temperature
    student_logits = student_logits / temperature
    if binary:
        t, s = ops.reshape(teacher_logits, (-1,)), ops.reshape(student_logits, (-1,))
        p_t = ops.sigmoid(t)
        # log s(x) = -softplus(-x), log(1 - s(x)) = -softplus(x): exact and stable for large |x|.
        kl = p_t * (ops.softplus(-s) - ops.softplus(-t)) + (1.0 - p_t) * (ops.softplus(s) - ops.softplus(t))
    else:
        log_p_t = ops.log_softmax(teacher_logits, axis=-1)
        log_p_s = ops.log_softmax(student_logits, axis=-1)
        kl = ops.sum(ops.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return temperature**2 * _weighted_mean(kl, sample_weight)


def _weighted_mean(values, sample_weight):
    if sample_weight is None:
        return ops.mean(values)
    weights = ops.cast(ops.reshape(sample_weight, (-1,)), values.dtype)
    return ops.sum(values * weights) / ops.maximum(ops.sum(weights), 1e-12)


class Distiller(keras.Model):
    """A frozen teacher (absent in cached mode) and a trainable student; ``call`` is the student."""

    def __init__(self, student: keras.Model, teacher: keras.Model | None, temperature: float, alpha: float, binary: bool, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.trainable = False
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.binary = binary
        # The two parts of the loss, logged only when there are two: a teacher or a no-KD student (alpha = 1)
        # has one loss, and epoch lines with "distillation_loss: 0.0000e+00" would claim a teacher it never had.
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss") if self.alpha < 1.0 else None
        self.distillation_loss_tracker = keras.metrics.Mean(name="distillation_loss") if self.alpha < 1.0 else None
        self.accuracy = (
            keras.metrics.BinaryAccuracy(name="accuracy") if binary else keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        )
        self.precision = keras.metrics.Precision(name="precision")
        self.recall = keras.metrics.Recall(name="recall")
        self.auc = keras.metrics.AUC(name="auc")

    def call(self, inputs, training=False):
        return self.student(inputs["image"], training=training)

    def teacher_logits(self, inputs):
        if "teacher_logits" in inputs:
            return inputs["teacher_logits"]
        if self.teacher is None:
            raise ValueError("online distillation needs a teacher model; cached mode needs 'teacher_logits' in the inputs")
        return self.teacher(inputs["image"], training=False)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        mixed = x is not None and "mix" in x
        student_loss = hard_loss(y, y_pred, self.binary, sample_weight, x["mix_labels"] if mixed else None, x["mix"] if mixed else None)
        if self.alpha >= 1.0:  # plain training or the no-KD baseline: the teacher is never consulted
            return student_loss
        distillation_loss = soft_loss(self.teacher_logits(x), y_pred, self.temperature, self.binary, sample_weight)
        self.student_loss_tracker.update_state(student_loss)
        self.distillation_loss_tracker.update_state(distillation_loss)
        return self.alpha * student_loss + (1.0 - self.alpha) * distillation_loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Unweighted: these describe the data as it is, not the class-rebalanced objective.
        if self.binary:
            probabilities = ops.sigmoid(ops.reshape(y_pred, (-1,)))
            labels = ops.reshape(y, (-1,))
            self.accuracy.update_state(labels, probabilities)
            for metric in (self.precision, self.recall, self.auc):
                metric.update_state(labels, probabilities)
        else:
            probabilities = ops.softmax(y_pred, axis=-1)
            one_hot = ops.one_hot(ops.cast(ops.reshape(y, (-1,)), "int32"), ops.shape(y_pred)[-1])
            self.accuracy.update_state(y, probabilities)
            for metric in (self.precision, self.recall, self.auc):
                metric.update_state(one_hot, probabilities)
        return self.get_metrics_result()
