"""Batched evaluation: a hold-out larger than the served model's request limit (MAX_BATCH) is scored through a
real logged pyfunc model in requests of at most MAX_BATCH rows, and gives the Keras model's own metrics."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from kdtest import tracking_at
from mlflow.exceptions import MlflowException
from PIL import Image

from pipelines.batches import in_batches
from pipelines.config import Config
from pipelines.evaluation.metrics import classification_metrics, model_logits, probabilities
from pipelines.models.builders import build_student
from pipelines.steps.prepare import prepare_data
from registry.model import MAX_BATCH
from registry.promote import holdout_frame, log_student, pyfunc_f1

HOLDOUT = MAX_BATCH + 44  # more than one request's worth, and not a multiple of it: the last chunk is partial


def _noise_split_set(root: Path, holdout: int, training: int = 8) -> Path:
    """Training/ and Testing/ folders of distinct random 40-px PNGs (no two alike), two classes."""
    rng = np.random.default_rng(0)
    for split, n in (("Training", training), ("Testing", holdout)):
        for i in range(n):
            label = ("no", "yes")[i % 2]
            (root / split / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(root / split / label / f"{i:04d}.png")
    return root


def test_in_batches_never_sends_more_than_the_batch_size_and_keeps_the_order() -> None:
    sizes: list[int] = []

    def record(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return batch * 2

    values = np.arange(10)
    np.testing.assert_array_equal(in_batches(record, values, 4), values * 2)
    assert sizes == [4, 4, 2]


@pytest.mark.slow
def test_a_holdout_over_the_request_limit_is_scored_through_the_real_pyfunc_model_in_requests(tmp_path: Path) -> None:
    cfg = Config(data_dir=str(_noise_split_set(tmp_path / "data", HOLDOUT)), image_size=32, folds=2, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg)
    test = prepared.splits.test
    assert len(test) == HOLDOUT > MAX_BATCH
    student = build_student("tiny", 32, 2, seed=1)  # random weights: equivalence, not accuracy, is under test
    frame = holdout_frame(prepared)
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"), mlflow.start_run():
        served = mlflow.pyfunc.load_model(log_student(student, prepared, cfg, frame.head(1)).model_uri)
    with pytest.raises(MlflowException, match=f"at most {MAX_BATCH}"):
        served.predict(frame)  # the serving limit still holds for one request

    labels = prepared.dataset.labels[test]
    metrics = pyfunc_f1(served, frame, labels, prepared.dataset.class_names)
    keras_probs = probabilities(model_logits(student, prepared.images[test]), binary=True)
    whole_probs = probabilities(np.asarray(student(prepared.images[test], training=False)), binary=True)
    np.testing.assert_allclose(keras_probs, whole_probs, atol=1e-5)  # chunking the Keras call changes nothing
    assert metrics == classification_metrics(labels, keras_probs)
