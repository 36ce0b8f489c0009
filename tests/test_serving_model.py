"""Model tests of the serving wrapper in process: image files and array batches in, probabilities out,
and every kind of bad request refused with INVALID_PARAMETER_VALUE (HTTP 400 when served)."""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from pipelines.config import Config
from pipelines.data.images import decode_bytes, load_images, preprocess
from pipelines.data.sources import ingest
from pipelines.models.builders import build_student
from registry.model import MAX_BATCH, StudentClassifier, encode_file


def _wrapper(root, **metadata) -> StudentClassifier:
    build_student("tiny", 32, 2, seed=3).save(root / "student.keras")
    (root / "metadata.json").write_text(json.dumps({"image_size": 32, "class_names": ["no", "yes"], **metadata}))
    model = StudentClassifier()
    model.load_context(SimpleNamespace(artifacts={"student": str(root / "student.keras"), "metadata": str(root / "metadata.json")}))
    return model


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> StudentClassifier:
    return _wrapper(tmp_path_factory.mktemp("served"))


def _png(size=(60, 40), mode="L") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, 90).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_files_and_the_equivalent_array_batch_give_the_same_probabilities(wrapper, real_data_dir):
    files = sorted((real_data_dir / "yes").iterdir())[:3] + sorted((real_data_dir / "no").iterdir())[:2]
    from_files = wrapper.predict(None, pd.DataFrame({"image": [encode_file(f) for f in files]}))
    # The array batch of the pixels the server decodes (a large JPEG at reduced scale: tests/test_images.py bounds the difference)
    batch = np.stack([preprocess(decode_bytes(f.read_bytes(), image_size=32), 32) for f in files])
    from_array = wrapper.predict(None, batch)
    assert list(from_files.columns) == ["label", "prob_no", "prob_yes"]
    np.testing.assert_allclose(from_files[["prob_no", "prob_yes"]].sum(axis=1), 1.0, rtol=1e-6)
    pd.testing.assert_frame_equal(from_files, from_array)
    assert all(from_files["label"] == np.where(from_files["prob_yes"] > 0.5, "yes", "no"))


def _rejects(wrapper, model_input, match: str) -> None:
    with pytest.raises(MlflowException, match=match) as error:
        wrapper.predict(None, model_input)
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.parametrize(
    "frame, match",
    [
        (pd.DataFrame({"image": [base64.b64encode(b"just some text").decode()]}), "row 0: cannot decode image"),
        (pd.DataFrame({"image": ["@@not-base64@@"]}), "not valid base64"),
        (pd.DataFrame({"image": [""]}), "non-empty base64"),
        (pd.DataFrame({"image": [3.5]}), "non-empty base64"),
        (pd.DataFrame({"picture": ["x"]}), "expected a column 'image'"),
        (pd.DataFrame({"image": []}), "empty batch"),
    ],
)
def test_bad_frames_are_refused(wrapper, frame, match):
    _rejects(wrapper, frame, match)


def test_truncated_file_is_refused(wrapper, real_data_dir):
    payload = sorted((real_data_dir / "yes").iterdir())[0].read_bytes()[:300]
    _rejects(wrapper, pd.DataFrame({"image": [base64.b64encode(payload).decode()]}), "row 0")


def test_oversized_images_are_refused_before_decoding(wrapper, monkeypatch):
    monkeypatch.setattr("pipelines.data.images.MAX_PIXELS", 100)  # a 60x40 image now counts as a decompression bomb
    _rejects(wrapper, pd.DataFrame({"image": [_png()]}), "exceeds 100 pixels")
    monkeypatch.setattr("registry.model.MAX_IMAGE_BYTES", 10)
    _rejects(wrapper, pd.DataFrame({"image": [_png()]}), "larger than")


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((2, 16, 16, 1), np.float32), "shape"),
        (np.full((1, 32, 32, 1), np.nan, np.float32), "NaN"),
        (np.array([[["a"] * 32] * 32], dtype=object)[..., None], "numeric"),
        (np.zeros((0, 32, 32, 1), np.float32), "empty batch"),
        (np.zeros((MAX_BATCH + 1, 32, 32, 1), np.float32), "at most"),
    ],
)
def test_bad_arrays_are_refused(wrapper, array, match):
    _rejects(wrapper, array, match)


def test_any_image_mode_is_served(wrapper):
    output = wrapper.predict(None, pd.DataFrame({"image": [_png(mode=m) for m in ("L", "RGB", "RGBA", "P")]}))
    assert len(output) == 4 and np.allclose(output[["prob_no", "prob_yes"]].sum(axis=1), 1.0)


def test_h5_and_nifti_slices_give_the_same_probabilities_as_their_preprocessed_arrays(tmp_path):
    """A model trained on BraTS data (channel t1ce in its metadata) serves the .h5 files and the NIfTI slices
    promote sends for a manifest's rows, exactly like the array path on the loader's images."""
    from brats_cases import write_h5_slices, write_nifti_cases

    served = _wrapper(tmp_path, modality="t1ce")
    write_h5_slices(tmp_path / "h5", volumes=2, slices=2)
    write_nifti_cases(tmp_path / "nifti", cases=2, depth=2)
    for source in ("h5", "nifti"):
        dataset = ingest(Config(data_dir=str(tmp_path / source), cache_dir=str(tmp_path / "cache"), modality="t1ce"))
        rows = list(dataset.manifest["path"])
        from_files = served.predict(None, pd.DataFrame({"image": [encode_file(p) for p in rows]}))
        from_array = served.predict(None, load_images(dataset, 32, tmp_path / "cache"))
        pd.testing.assert_frame_equal(from_files, from_array)
        assert len(set(from_files["prob_yes"])) > 1  # distinct slices, distinct answers: the comparison is not vacuous


def test_a_model_trained_on_pictures_refuses_h5_slices_and_nifti_volumes_clearly(wrapper, tmp_path):
    import nibabel
    from brats_cases import write_h5_slices

    h5_file = next(iter(write_h5_slices(tmp_path / "h5", volumes=1, slices=2)))
    _rejects(wrapper, pd.DataFrame({"image": [encode_file(h5_file)]}), "row 0: a BraTS .h5 slice, but no modality is known")
    volume = nibabel.Nifti1Image(np.ones((8, 8, 3), np.float32), np.eye(4)).to_bytes()
    _rejects(wrapper, pd.DataFrame({"image": [base64.b64encode(volume).decode()]}), r"row 0: NIfTI shape \(8, 8, 3\); send one 2-D slice")


@pytest.mark.parametrize(
    "prefix", ["data:image/png;base64,", "DATA:image/PNG;BASE64,", "data:;base64,", "data:image/png;name=scan%201.png;base64,"]
)
def test_a_browsers_data_uri_is_served_like_the_plain_base64(wrapper, prefix):
    plain = _png()
    expected = wrapper.predict(None, pd.DataFrame({"image": [plain]}))
    pd.testing.assert_frame_equal(wrapper.predict(None, pd.DataFrame({"image": [prefix + plain]})), expected)
    pd.testing.assert_frame_equal(wrapper.predict(None, pd.DataFrame({"image": [(prefix + plain).encode()]})), expected)


@pytest.mark.parametrize(
    "text", ["data:image/png," + _png(), "data:image/png;base64;" + _png(), "xdata:image/png;base64," + _png(), "data:image/png;base64,@@"]
)
def test_a_data_uri_without_valid_base64_is_refused(wrapper, text):
    _rejects(wrapper, pd.DataFrame({"image": [text]}), "not valid base64")


# ------------------------------------------------------------------------------- serving formats


@pytest.fixture(scope="module")
def formats_served(mri_subset, tmp_path_factory):
    """A tiny student trained briefly on real scans, logged by promote's log_student once per serving format (each
    carrying every TFLite export) and loaded back with mlflow.pyfunc.load_model: the served model as users get it."""
    import keras
    import mlflow
    from kdtest import tracking_at

    from pipelines.steps.prepare import prepare_data
    from pipelines.training.fit import set_seed
    from registry.export import tflite_exports
    from registry.promote import holdout_frame, log_student

    root = tmp_path_factory.mktemp("formats")
    cfg = Config(data_dir=str(mri_subset), image_size=32, folds=2, cache_dir=str(root / "cache"))
    prepared = prepare_data(cfg)
    set_seed(0)
    student = build_student("tiny", 32, 2, seed=0)
    # Trained a little, so that its probabilities spread away from 0.5 and the labels say something.
    student.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    student.fit(prepared.images, prepared.dataset.labels.astype("float32"), epochs=8, batch_size=8, verbose=0)
    exports = tflite_exports(student, prepared)
    frame = pd.DataFrame({"image": [encode_file(p) for p in prepared.dataset.manifest["path"]]})
    models = {}
    with tracking_at(f"sqlite:///{root / 'mlflow.db'}"):
        with mlflow.start_run():
            for name in ("keras", *exports):
                info = log_student(student, prepared, cfg, holdout_frame(prepared).head(1), exports, name)
                models[name] = SimpleNamespace(uri=info.model_uri, model=mlflow.pyfunc.load_model(info.model_uri))
        yield SimpleNamespace(models=models, frame=frame, tracking_uri=mlflow.get_tracking_uri())


# INT8 rounds weights and activations: its probabilities may move this much; float32 TFLite is the same arithmetic.
TOLERANCE = {"keras": 1e-6, "tflite-float32": 1e-5, "tflite-int8": 0.05}


@pytest.mark.parametrize("serving_format", ["tflite-float32", "tflite-int8"])
def test_each_tflite_serving_format_answers_like_the_keras_student(formats_served, serving_format):
    reference = formats_served.models["keras"].model.predict(formats_served.frame)
    served = formats_served.models[serving_format]
    assert served.model.unwrap_python_model().serving_format == serving_format
    output = served.model.predict(formats_served.frame)
    assert list(output.columns) == list(reference.columns) == ["label", "prob_no", "prob_yes"]
    probs, expected = output[["prob_no", "prob_yes"]].to_numpy(), reference[["prob_no", "prob_yes"]].to_numpy()
    np.testing.assert_allclose(probs, expected, atol=TOLERANCE[serving_format])
    # Same label wherever the Keras answer is not within the tolerance of a tie.
    decisive = np.abs(expected[:, 1] - 0.5) > TOLERANCE[serving_format]
    assert decisive.sum() >= len(decisive) // 2, "the student answers near 0.5 everywhere: the label check would say nothing"
    assert list(output["label"][decisive]) == list(reference["label"][decisive])
    assert np.ptp(expected[:, 1]) > 0.1, "the scans get different answers: the comparison is not vacuous"


def test_a_tflite_served_model_answers_over_http_like_in_process(formats_served):
    from kdtest import _post

    from registry.server import serve_model

    served = formats_served.models["tflite-int8"]
    rows = formats_served.frame.iloc[:6]
    server, port = serve_model(served.uri, formats_served.tracking_uri)
    try:
        status, body = _post(port, json.dumps({"dataframe_split": {"columns": ["image"], "data": rows.to_numpy().tolist()}}).encode())
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert status == 200, body
    answered, local = pd.DataFrame(body["predictions"]), served.model.predict(rows)
    assert list(answered["label"]) == list(local["label"])
    np.testing.assert_allclose(answered[["prob_no", "prob_yes"]].to_numpy(), local[["prob_no", "prob_yes"]].to_numpy(), atol=1e-6)


def test_auto_serves_the_fastest_format_within_the_f1_tolerance_of_keras():
    from registry.promote import choose_serving_format

    results = {
        "keras": {"f1": 0.90, "p50_ms": 4.0},
        "tflite-float32": {"f1": 0.90, "p50_ms": 1.0},
        "tflite-int8": {"f1": 0.896, "p50_ms": 0.5},
    }
    assert choose_serving_format(results) == "tflite-int8"  # 0.004 below Keras: within 0.005
    assert choose_serving_format({**results, "tflite-int8": {"f1": 0.894, "p50_ms": 0.5}}) == "tflite-float32"
    assert choose_serving_format({"keras": {"f1": 0.9, "p50_ms": 4.0}, "tflite-int8": {"f1": 0.7, "p50_ms": 0.1}}) == "keras"
    assert choose_serving_format(results, "keras") == "keras", "an explicit format is served whatever the timings"


def test_the_server_threads_share_the_cores_among_the_workers(monkeypatch):
    from registry.model import server_workers, serving_threads

    cores = len(__import__("os").sched_getaffinity(0))
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    monkeypatch.setenv("MLFLOW_MODELS_WORKERS", str(cores * 2))
    assert server_workers() == cores * 2 and serving_threads() == 1
    monkeypatch.setenv("MLFLOW_MODELS_WORKERS", "1")
    assert serving_threads() == cores
