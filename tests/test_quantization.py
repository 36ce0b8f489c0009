"""A truly INT8 student: BatchNorm (or no normalisation) folds into the convolutions, so the full-integer TFLite graph has
no float operator between its int8 input and output, where GroupNorm's statistics hop back to float; precise BatchNorm
statistics; and quantization-aware training, whose INT8 export predicts what its fake-quantized Keras model predicts."""

from __future__ import annotations

import tempfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from kdtest import tiny_config, tracking_at

from pipelines.config import Config, PipelineError
from pipelines.evaluation.metrics import model_logits
from pipelines.models.builders import FakeQuant, build_student, load_keras_model, recalibrate_batch_norm
from pipelines.names import Metric
from pipelines.steps.prepare import prepare_data
from pipelines.training.quantize import TFLiteModel, fine_tune_qat, float_ops, fold_batch_norm, int8_export, qat_model


def _images(count: int = 48, size: int = 32, seed: int = 0) -> np.ndarray:
    """Z-scored-like images with a bright blob in some, so activations have structure."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count, size, size, 1)).astype(np.float32)
    images[::2, size // 4 : size // 2, size // 4 : size // 2] += 3.0
    return images


def test_student_norm_and_qat_are_checked_with_the_config() -> None:
    assert Config(student_norm="batch", qat=True).qat
    with pytest.raises(PipelineError, match="^student_norm='layer': use group, batch, none"):
        Config(student_norm="layer")
    with pytest.raises(PipelineError, match="^qat=true with student_norm=group: .*student_norm=batch"):
        Config(qat=True)


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_an_int8_export_of_a_batch_norm_or_norm_free_student_has_no_float_operator(norm: str) -> None:
    images = _images()
    student = build_student("8x2", 32, 2, seed=1, norm=norm)
    recalibrate_batch_norm(student, images)  # statistics of these images, not the initial (0, 1)
    folded = fold_batch_norm(student)
    assert not any("norm" in layer.name for layer in folded.layers)
    np.testing.assert_allclose(model_logits(folded, images), model_logits(student, images), rtol=1e-4, atol=1e-4)
    flatbuffer = int8_export(student, images)
    tflite = TFLiteModel(flatbuffer)
    assert tflite.input["dtype"] == np.int8 and tflite.output["dtype"] == np.int8
    assert float_ops(flatbuffer) == [], "an all-integer graph: no operator reads or writes float32"


def test_a_group_norm_students_int8_export_falls_back_to_float_and_cannot_be_folded() -> None:
    images = _images()
    student = build_student("8x2", 32, 2, seed=1, norm="group")
    fallbacks = float_ops(int8_export(student, images))
    assert "DEQUANTIZE" in fallbacks and "QUANTIZE" in fallbacks, fallbacks
    with pytest.raises(PipelineError, match="GroupNorm .* cannot be folded"):
        fold_batch_norm(student)


def test_precise_batch_norm_statistics_normalise_the_images_they_were_computed_on() -> None:
    images = _images(64)
    student = build_student("8x2", 32, 2, seed=3, norm="batch")
    recalibrate_batch_norm(student, images)
    for block in (1, 2):
        norm = student.get_layer(f"block{block}_norm")
        outputs = np.asarray(keras.Model(student.input, norm.output)(images, training=False)).reshape(-1, norm.output.shape[-1])
        # gamma 1 and beta 0 as initialised: inference normalises every channel to mean 0 and variance 1 on these images
        np.testing.assert_allclose(outputs.mean(0), 0.0, atol=1e-3)
        np.testing.assert_allclose(outputs.var(0), 1.0, rtol=2e-2)


def test_a_qat_models_int8_export_predicts_what_its_fake_quantized_keras_model_predicts(real_data_dir, tmp_path) -> None:
    from pipelines.models.distiller import Distiller
    from pipelines.training.fit import train_on_all_data

    cfg = Config(
        data_dir=str(real_data_dir),
        image_size=32,
        folds=2,
        epochs=3,
        batch_size=16,
        student_norm="batch",
        cache_dir=str(tmp_path / "cache"),
    )
    prepared = prepare_data(cfg)
    train, test = prepared.splits.train, prepared.splits.test

    def build_trainer() -> Distiller:
        trainer = Distiller(build_student("8x2", 32, 2, seed=0, norm="batch"), None, cfg.temperature, 1.0, True)
        trainer.compile(optimizer="adam")
        return trainer

    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"), mlflow.start_run():
        student = train_on_all_data(prepared, cfg, build_trainer, None, cfg.epochs, "student", recalibrate=True)
        qat = fine_tune_qat(student, cfg, prepared.images[train], prepared.dataset.labels[train])
    flatbuffer = int8_export(qat, prepared.images[train])
    assert float_ops(flatbuffer) == []
    keras_labels = model_logits(qat, prepared.images[test])[:, 0] > 0
    int8_labels = TFLiteModel(flatbuffer).logits(prepared.images[test])[:, 0] > 0
    agreement = float(np.mean(keras_labels == int8_labels))
    assert agreement >= 0.99, f"the INT8 export agrees with its QAT model on {agreement:.1%} of {len(test)} hold-out scans"
    assert 0 < keras_labels.sum() < len(test) or len(set(prepared.dataset.labels[test])) == 1, "a model predicting one class proves little"
    qat.save(tmp_path / "qat.keras")
    loaded = load_keras_model(tmp_path / "qat.keras")  # safe mode: the fake-quantization layers are this project's, by name
    np.testing.assert_array_equal(model_logits(loaded, prepared.images[test]), model_logits(qat, prepared.images[test]))


def test_qat_model_keeps_the_student_and_starts_from_its_function() -> None:
    images = _images()
    student = build_student("8x2", 32, 2, seed=2, norm="batch")
    recalibrate_batch_norm(student, images)
    before = [weight.copy() for weight in student.get_weights()]
    qat = qat_model(student, images)
    assert all(np.array_equal(a, b) for a, b in zip(before, student.get_weights())), "the float student is kept as it was"
    float_logits, qat_logits = model_logits(student, images), model_logits(qat, images)
    # 8-bit rounding moves the logits by a few quantization steps, not more
    assert np.max(np.abs(float_logits - qat_logits)) < 0.05 * np.max(np.abs(float_logits)) + 0.05


@pytest.mark.slow
def test_distill_with_qat_fine_tunes_logs_and_saves_every_folds_quantization_aware_student(tmp_path) -> None:
    from pipelines.steps.distill import distill

    cfg = tiny_config("", tmp_path, synthetic_images=40, epochs=1, teacher_arch="resnet:S", student_norm="batch", qat=True)
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        run = mlflow.get_run(distill(cfg))
        with tempfile.TemporaryDirectory() as tmp:
            models = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="models", dst_path=tmp))
            qat_models = [load_keras_model(models / f"student_qat_fold_{k}.keras") for k in range(2)]
            students = [load_keras_model(models / f"student_fold_{k}.keras") for k in range(2)]
    assert run.data.params["qat"] == "True" and run.data.params["student_norm"] == "batch" and "kd.teacher_run_id" in run.data.tags
    metrics = run.data.metrics
    assert 0.0 <= metrics[Metric.QAT_F1_MEAN] <= 1.0 and {"qat_f1_fold_0", "qat_f1_fold_1", "f1_mean"} <= set(metrics)
    assert all(any(isinstance(layer, FakeQuant) for layer in model.layers) for model in qat_models)
    assert all(any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers) for model in students), "float kept"
    images = prepare_data(cfg).images[:20]
    assert float_ops(int8_export(qat_models[0], images)) == []
