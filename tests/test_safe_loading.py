"""Safe loading: model files that could run code are refused before anything in them runs.

Each malicious file is real and live: a Lambda layer whose lambda, or a pickle whose ``__reduce__``,
creates a marker file when executed. The control test shows Keras with safe mode off does run it; every
loader of the project must refuse it with a PipelineError and leave no marker.
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import keras
import mlflow
import numpy as np
import pytest
from kdtest import tracking_at

from pipelines.config import PipelineError
from pipelines.models.builders import build_student, build_teacher, load_keras_model
from registry.model import StudentClassifier


class MarkerPickle:
    """Unpickling this creates the marker file: what a malicious pickle would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "EXECUTED"


@pytest.fixture
def lambda_model(tmp_path: Path, marker: Path) -> Path:
    """A .keras file with a Lambda layer whose Python lambda writes the marker (as saving traced it once)."""
    target = str(marker)  # a closure over a str: Keras stores it beside the lambda's bytecode
    inputs = keras.Input((32, 32, 1), name="image")
    touched = keras.layers.Lambda(lambda x: (open(target, "w").close(), x)[1])(inputs)
    outputs = keras.layers.Dense(1, name="logits")(keras.layers.GlobalAveragePooling2D()(touched))
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    marker.unlink()  # building the model ran the lambda; from here on it must not run again
    return path


@pytest.fixture
def pickle_file(tmp_path: Path, marker: Path) -> Path:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(MarkerPickle(marker)))
    return path


def _with_config(source: Path, target: Path, change) -> Path:
    """A copy of a .keras archive with its config.json edited by ``change(config)``."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for item in archive.infolist():
            payload = archive.read(item)
            if item.filename == "config.json":
                config = json.loads(payload)
                change(config)
                payload = json.dumps(config).encode()
            out.writestr(item, payload)
    return target


def test_the_lambda_file_is_live_when_safe_mode_is_off(lambda_model: Path, marker: Path) -> None:
    """Control: without safe mode, loading runs the lambda; so the refusals below are real protection."""
    keras.models.load_model(lambda_model, compile=False, safe_mode=False)
    assert marker.exists()


def test_lambda_layer_is_refused_before_it_runs(lambda_model: Path, marker: Path, reliability) -> None:
    with pytest.raises(PipelineError, match="Lambda layer") as error:
        load_keras_model(lambda_model)
    assert str(lambda_model) in str(error.value)
    assert not marker.exists()
    reliability.bad_input(
        "model file: .keras with a Lambda layer (load_keras_model)", "refused with PipelineError before deserialising; lambda not executed"
    )


def test_non_keras_objects_in_the_config_are_refused(tmp_path: Path, marker: Path, reliability) -> None:
    """A config naming a class outside Keras (imported by module name on load) is refused, as a Lambda is."""
    build_student("tiny", 32, 2).save(tmp_path / "student.keras")

    def smuggle(config):
        layer = config["config"]["layers"][1]
        layer["module"], layer["class_name"] = "os", "system"

    path = _with_config(tmp_path / "student.keras", tmp_path / "smuggled.keras", smuggle)
    with pytest.raises(PipelineError, match=r"os\.system"):
        load_keras_model(path)
    reliability.bad_input(
        "model file: .keras config naming a non-Keras class (os.system)", "refused with PipelineError before deserialising"
    )


@pytest.mark.parametrize(
    "module, class_name, registered_name",
    [("os", "system", "kd_brain>FakeQuant"), ("pipelines.models.builders", "PipelineError", "kd_brain>PipelineError")],
)
def test_only_this_projects_own_quantization_layers_pass_as_registered_objects(
    tmp_path: Path, module: str, class_name: str, registered_name: str
) -> None:
    """A quantization-aware student's fake-quantization layers load in safe mode by their registered names; a config that
    keeps such a name but points at another module, or names another object of ours, is refused."""
    build_student("tiny", 32, 2, norm="none", quantized=True).save(tmp_path / "qat.keras")
    assert load_keras_model(tmp_path / "qat.keras").name == "student_8x2_qat"

    def smuggle(config):
        layer = next(layer for layer in config["config"]["layers"] if layer.get("registered_name") == "kd_brain>FakeQuant")
        layer["module"], layer["class_name"], layer["registered_name"] = module, class_name, registered_name

    with pytest.raises(PipelineError, match=f"refused: the model contains {module}.{class_name}"):
        load_keras_model(_with_config(tmp_path / "qat.keras", tmp_path / "smuggled.keras", smuggle))


@pytest.mark.parametrize("name", ["model.pkl", "student.keras", "teacher.h5"])
def test_pickles_in_any_name_are_refused_unopened(pickle_file: Path, marker: Path, tmp_path: Path, name: str, reliability) -> None:
    path = tmp_path / "renamed" / name
    path.parent.mkdir()
    shutil.copy(pickle_file, path)
    with pytest.raises(PipelineError, match="not a Keras .keras archive"):
        load_keras_model(path)
    assert not marker.exists()
    reliability.bad_input(f"model file: pickle named {name} (load_keras_model)", "refused with PipelineError; never unpickled")


def test_legacy_hdf5_model_is_refused(tmp_path: Path, reliability) -> None:
    build_student("tiny", 32, 2).save(tmp_path / "student.h5")
    with pytest.raises(PipelineError, match="legacy HDF5"):
        load_keras_model(tmp_path / "student.h5")
    reliability.bad_input("model file: legacy HDF5 model (load_keras_model)", "refused with PipelineError")


def test_a_plain_student_loads_and_predicts_the_same(tmp_path: Path) -> None:
    student = build_student("tiny", 32, 2, seed=5)
    student.save(tmp_path / "student.keras")
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 1)).astype(np.float32)
    np.testing.assert_array_equal(load_keras_model(tmp_path / "student.keras")(images), student(images))


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    with tracking_at(f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"):
        mlflow.set_experiment("safe-loading")
        yield


def test_teacher_run_artifacts_are_loaded_safely(tracking, lambda_model: Path, pickle_file: Path, marker: Path, reliability) -> None:
    """A teacher run whose model and logits artifacts were replaced by malicious files (a writer to the store)."""
    from pipelines.steps.teacher import LOGITS_ARTIFACT, load_teacher_logits, load_teacher_model

    staged = lambda_model.parent / "staged"
    (staged / "models").mkdir(parents=True)
    (staged / "logits").mkdir()
    shutil.copy(lambda_model, staged / "models" / "all.keras")
    shutil.copy(pickle_file, staged / "models" / "fold_0.keras")
    # Logits keyed by object (pickled) strings, one of which unpickles into the marker.
    np.savez_compressed(
        staged / LOGITS_ARTIFACT, sha256=np.array(["a" * 64, MarkerPickle(marker)], dtype=object), all=np.zeros((2, 1), np.float32)
    )
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(staged))

    with pytest.raises(PipelineError, match="Lambda layer"):
        load_teacher_model(run.info.run_id, "all")
    with pytest.raises(PipelineError, match="not a Keras .keras archive"):
        load_teacher_model(run.info.run_id, "fold_0")
    with pytest.raises(PipelineError, match="pickled objects"):
        load_teacher_logits(run.info.run_id, np.array(["a" * 64]))
    assert not marker.exists()
    reliability.bad_input(
        "teacher run artifacts: Lambda .keras, pickle as .keras, pickled logits .npz", "each refused with PipelineError; nothing executed"
    )


def test_served_student_is_loaded_safely(
    tracking, lambda_model: Path, pickle_file: Path, marker: Path, tmp_path: Path, reliability
) -> None:
    """The pyfunc's load_context, in process and through mlflow.pyfunc.load_model of a logged model."""
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps({"image_size": 32, "class_names": ["no", "yes"]}))
    for student in (lambda_model, pickle_file):
        with pytest.raises(PipelineError, match=str(student.name)):
            StudentClassifier().load_context(SimpleNamespace(artifacts={"student": str(student), "metadata": str(metadata)}))
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=StudentClassifier(), artifacts={"student": str(lambda_model), "metadata": str(metadata)}
        )
    with pytest.raises(PipelineError, match="Lambda layer"):
        mlflow.pyfunc.load_model(info.model_uri)
    assert not marker.exists()
    reliability.bad_input(
        "served model: Lambda .keras / pickle as the pyfunc's student", "load_context refuses with PipelineError; nothing executed"
    )


def _weights_of_a_no_top_backbone(path: Path) -> list[np.ndarray]:
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg")
    backbone.save_weights(path)
    return backbone.get_weights()


def test_teacher_weights_load_and_refuse(lambda_model: Path, pickle_file: Path, marker: Path, tmp_path: Path, reliability) -> None:
    """Config.teacher_weights: real weights load; pickles and whole models (with a Lambda) are refused unexecuted."""
    expected = _weights_of_a_no_top_backbone(tmp_path / "mobilenet.weights.h5")
    teacher = build_teacher("MobileNetV2", 32, 2, weights=str(tmp_path / "mobilenet.weights.h5"))
    backbone = next(layer for layer in teacher.layers if isinstance(layer, keras.Model))
    assert all(np.array_equal(a, b) for a, b in zip(backbone.get_weights(), expected))

    pickle_as_h5 = tmp_path / "weights.h5"
    shutil.copy(pickle_file, pickle_as_h5)
    for weights, needle in (
        (pickle_file, "pickles and other formats"),
        (pickle_as_h5, "not MobileNetV2 weights"),
        (lambda_model, "not MobileNetV2 weights"),
    ):
        with pytest.raises(PipelineError, match=needle):
            build_teacher("MobileNetV2", 32, 2, weights=str(weights))
    assert not marker.exists()
    reliability.bad_input(
        "teacher_weights: pickle (.pkl, and named .h5), a Lambda .keras model", "refused with PipelineError; nothing executed"
    )
