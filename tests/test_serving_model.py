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
from pipelines.images import decode_image, load_images, preprocess
from pipelines.models import build_student
from pipelines.sources import ingest
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
    monkeypatch.setattr("pipelines.images.MAX_PIXELS", 100)  # a 60x40 image now counts as a decompression bomb
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
