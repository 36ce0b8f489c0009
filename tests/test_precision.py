"""Training precision (Config.precision): bfloat16 trains under Keras mixed_bfloat16, and everything that leaves
training (saved models, cached teacher logits, what is served and exported) is float32; the policy never leaks."""

from __future__ import annotations

import json
import zipfile

import keras
import mlflow
import numpy as np
import pytest
from kdtest import tiny_config, tracking_at

from pipelines.config import DISTILL_PARAMS, SEARCH_PARAMS, TEACHER_PARAMS, Config, PipelineError
from pipelines.evaluation.metrics import model_logits
from pipelines.models.builders import build_student, load_keras_model
from pipelines.models.distiller import Distiller
from pipelines.steps.prepare import prepare_data
from pipelines.tracking.runs import step_key
from pipelines.training.crossval import cross_validate
from pipelines.training.fit import as_float32, make_dataset, set_seed, train_on_all_data, training_precision

SIZE = 32


def _dtype_names(config) -> set[str]:
    """Every dtype policy named in a (saved) model config."""
    if isinstance(config, dict):
        own = {config["config"]["name"]} if config.get("class_name") == "DTypePolicy" else set()
        return own.union(*(_dtype_names(value) for value in config.values()))
    if isinstance(config, list):
        return set().union(*(_dtype_names(value) for value in config))
    return set()


def _saved_dtype_names(path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        return _dtype_names(json.loads(archive.read("config.json")))


def test_a_bfloat16_student_becomes_a_float32_twin_with_the_very_same_weights(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(32) % 2
    images = rng.normal(size=(32, SIZE, SIZE, 1)).astype(np.float32)
    images[labels == 1, 8:20, 8:20] += 2.0
    set_seed(0)
    with training_precision("bfloat16"):
        student = build_student("tiny", SIZE, 2, seed=0)
        trainer = Distiller(student, None, 1.0, 1.0, binary=True)
        trainer.compile(optimizer=keras.optimizers.Adam(3e-3))
        trainer.fit(make_dataset(images, labels, batch_size=8, shuffle=True), epochs=2, verbose=0)
    assert keras.config.dtype_policy().name == "float32", "the mixed policy leaked out of training"
    assert student.layers[1].compute_dtype == "bfloat16" and student.get_layer("logits").compute_dtype == "float32"
    assert all(w.dtype == np.float32 for w in student.get_weights()), "mixed precision keeps float32 variables"

    twin = as_float32(student)
    assert twin is not student and all(layer.dtype_policy.name == "float32" for layer in twin._flatten_layers())
    assert all(np.array_equal(a, b) for a, b in zip(student.get_weights(), twin.get_weights()))
    # The same weights in float32 arithmetic: close to the bfloat16 model's logits (8-bit mantissa), not equal.
    mixed, exact = np.asarray(student(images, training=False)), model_logits(twin, images)
    assert exact.dtype == np.float32 and not np.array_equal(mixed, exact)
    np.testing.assert_allclose(mixed, exact, atol=0.1 * np.abs(exact).max())

    twin.save(tmp_path / "student.keras")
    assert _saved_dtype_names(tmp_path / "student.keras") == {"float32"}
    loaded = load_keras_model(tmp_path / "student.keras")  # safe mode, config checked
    assert np.array_equal(model_logits(loaded, images), exact)
    assert as_float32(loaded) is loaded, "a float32 model is used as it is"


def test_the_policy_comes_back_when_training_fails_and_a_bad_precision_is_one_clear_error():
    with pytest.raises(RuntimeError), training_precision("bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        raise RuntimeError("training failed")
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(PipelineError, match=r"precision='float16': use 'float32' or 'bfloat16'"):
        Config(precision="float16")


def test_bfloat16_cross_validation_and_all_data_training_hand_back_float32_models(mri_subset, tmp_path):
    """The machinery every step trains through (teacher, distill, search, promote): what comes out is float32,
    so logged models, cached teacher logits and the served model are float32 whatever was trained."""
    cfg = tiny_config(mri_subset, tmp_path, epochs=1, precision="bfloat16")
    prepared = prepare_data(cfg)
    built = []

    def build(seed: int) -> Distiller:
        built.append(build_student("tiny", cfg.image_size, 2, seed=seed))
        trainer = Distiller(built[-1], None, 1.0, 1.0, binary=True)
        trainer.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
        return trainer

    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        mlflow.set_experiment("precision")  # not the experiment an earlier test left selected in another store
        with mlflow.start_run():
            cv = cross_validate(prepared, cfg, [0, 1], build, lambda k: None, "student")
            everything = train_on_all_data(prepared, cfg, lambda: build(cfg.seed), None, 1, "student")
    assert all(model.layers[1].compute_dtype == "bfloat16" for model in built), "trained under mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"
    for model in [*cv.models, everything]:
        assert {layer.dtype_policy.name for layer in model._flatten_layers()} == {"float32"}
        assert model_logits(model, prepared.images).dtype == np.float32
    # Reuse keys tell the precisions apart: a float32 request never reuses a bfloat16 run, nor the reverse.
    for names in (TEACHER_PARAMS, DISTILL_PARAMS, SEARCH_PARAMS):
        assert step_key(cfg, names) != step_key(cfg.replace(precision="float32"), names)
