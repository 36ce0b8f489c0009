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

from pipelines import data
from pipelines.data import decode_image, preprocess
from pipelines.models import build_student
from registry.model import MAX_BATCH, StudentClassifier, encode_file


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> StudentClassifier:
    root = tmp_path_factory.mktemp("served")
    build_student("tiny", 32, 2, seed=3).save(root / "student.keras")
    (root / "metadata.json").write_text(json.dumps({"image_size": 32, "class_names": ["no", "yes"]}))
    model = StudentClassifier()
    model.load_context(SimpleNamespace(artifacts={"student": str(root / "student.keras"), "metadata": str(root / "metadata.json")}))
    return model


def _png(size=(60, 40), mode="L") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, 90).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_files_and_the_equivalent_array_batch_give_the_same_probabilities(wrapper, real_data_dir):
    files = sorted((real_data_dir / "yes").iterdir())[:3] + sorted((real_data_dir / "no").iterdir())[:2]
    from_files = wrapper.predict(None, pd.DataFrame({"image": [encode_file(f) for f in files]}))
    batch = np.stack([preprocess(decode_image(f), 32) for f in files])
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
    monkeypatch.setattr(data, "MAX_PIXELS", 100)  # a 60x40 image now counts as a decompression bomb
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


@pytest.mark.parametrize("prefix", ["data:image/png;base64,", "DATA:image/PNG;BASE64,", "data:;base64,", "data:image/png;name=scan%201.png;base64,"])
def test_a_browsers_data_uri_is_served_like_the_plain_base64(wrapper, prefix):
    plain = _png()
    expected = wrapper.predict(None, pd.DataFrame({"image": [plain]}))
    pd.testing.assert_frame_equal(wrapper.predict(None, pd.DataFrame({"image": [prefix + plain]})), expected)
    pd.testing.assert_frame_equal(wrapper.predict(None, pd.DataFrame({"image": [(prefix + plain).encode()]})), expected)


@pytest.mark.parametrize("text", ["data:image/png," + _png(), "data:image/png;base64;" + _png(), "xdata:image/png;base64," + _png(), "data:image/png;base64,@@"])
def test_a_data_uri_without_valid_base64_is_refused(wrapper, text):
    _rejects(wrapper, pd.DataFrame({"image": [text]}), "not valid base64")
