"""Numerical health: a non-finite loss stops training with a clear error and a FAILED run; the same seed
trains bitwise the same student on CPU, and another seed does not.

The slow end-to-end NaN case (a teacher step with learning_rate=1e30) lives in test_pipeline_e2e.py;
these tests drive the same ``fit`` with a tiny student, for an infinite loss as well as a NaN one.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from kdtest import child_env, tracking_at
from mlflow import MlflowClient

from pipelines.config import Config, PipelineError
from pipelines.evaluation.metrics import model_logits
from pipelines.models.builders import build_student
from pipelines.models.distiller import Distiller
from pipelines.training.fit import as_float32, fit, make_dataset, set_seed, training_precision

N_IMAGES, SIZE = 32, 32


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    with tracking_at(f"sqlite:///{tmp_path_factory.mktemp('numerics') / 'mlflow.db'}"):
        mlflow.set_experiment("numerics")
        yield MlflowClient()


def _images_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """Images that differ by class (a bright square for the positives), z-scored like preprocess output."""
    rng = np.random.default_rng(0)
    labels = np.arange(N_IMAGES) % 2
    images = rng.normal(size=(N_IMAGES, SIZE, SIZE, 1)).astype(np.float32)
    images[labels == 1, 10:20, 10:20] += 2.0
    images = (images - images.mean(axis=(1, 2, 3), keepdims=True)) / images.std(axis=(1, 2, 3), keepdims=True)
    return images, labels


def _trainer(cfg: Config) -> Distiller:
    set_seed(cfg.seed)
    student = build_student("tiny", SIZE, 2, seed=cfg.seed)
    trainer = Distiller(student, None, cfg.temperature, cfg.alpha, binary=True)
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
    return trainer


DIVERGENCES = {
    # T^2 = 1e40 overflows float32: the distillation term, and so the loss, is +inf from the first step.
    "inf": (dict(temperature=1e20, alpha=0.0), np.full((N_IMAGES, 1), 1e21, np.float32)),
    # Cached teacher logits gone bad (one NaN): the loss is NaN.
    "nan": (dict(temperature=4.0, alpha=0.5), np.where(np.arange(N_IMAGES)[:, None] == 3, np.nan, 1.0).astype(np.float32)),
}


@pytest.mark.parametrize("kind", sorted(DIVERGENCES))
def test_non_finite_loss_stops_training_with_a_failed_run(tracking: MlflowClient, kind: str, reliability) -> None:
    changes, teacher_logits = DIVERGENCES[kind]
    cfg = Config(image_size=SIZE, epochs=5, patience=5, batch_size=N_IMAGES, learning_rate=1e-3)
    vars(cfg).update(changes)  # past Config's ranges on purpose (T=1e20): the guard must hold whatever reaches training
    images, labels = _images_and_labels()
    train = make_dataset(images, labels, teacher_logits=teacher_logits, batch_size=cfg.batch_size)
    with pytest.raises(PipelineError, match=r"student: training diverged at epoch 1 \(.*'loss': " + kind) as error:
        with mlflow.start_run() as run:
            fit(_trainer(cfg), train, None, cfg, prefix="", describe="student")
    assert "lower learning_rate" in str(error.value)
    finished = tracking.get_run(run.info.run_id)
    assert finished.info.status == "FAILED"
    assert not finished.data.metrics, "no metric of the diverged epoch reaches MLflow"
    running = tracking.search_runs([finished.info.experiment_id], "attributes.status = 'RUNNING'")
    reliability.fault(
        f"{kind} loss in training (tiny student, {', '.join(f'{k}={v}' for k, v in changes.items())})",
        "PipelineError at epoch 1, MLflow run FAILED, no non-finite metric logged",
    )
    reliability.lost("runs", len(running), f"runs left RUNNING after the {kind} loss")
    assert not running


def _train_once(seed: int, precision: str = "float32") -> tuple[list[np.ndarray], np.ndarray]:
    """Two epochs with every source of randomness on: initialisation, shuffling, augmentation, dropout."""
    cfg = Config(image_size=SIZE, epochs=2, batch_size=8, learning_rate=3e-3, augment=True, seed=seed, alpha=1.0, precision=precision)
    images, labels = _images_and_labels()
    with training_precision(precision):
        trainer = _trainer(cfg)
    train = make_dataset(images, labels, batch_size=cfg.batch_size, shuffle=True, augment=True, seed=seed)
    with mlflow.start_run():
        fit(trainer, train, None, cfg, prefix="", describe=f"seed {seed}")
    student = as_float32(trainer.student)
    return student.get_weights(), model_logits(student, images)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_same_seed_trains_bitwise_the_same_student(tracking: MlflowClient, precision: str) -> None:
    first_weights, first_logits = _train_once(7, precision)
    again_weights, again_logits = _train_once(7, precision)
    other_weights, other_logits = _train_once(8, precision)
    assert len(first_weights) == len(again_weights)
    assert all(np.array_equal(a, b) for a, b in zip(first_weights, again_weights)), "same seed, different weights"
    assert np.array_equal(first_logits, again_logits), "same seed, different logits"
    assert not np.array_equal(first_logits, other_logits), "another seed gave the very same model"
    assert any(not np.array_equal(a, b) for a, b in zip(first_weights, other_weights))


@pytest.mark.slow
def test_a_fresh_process_trains_bitwise_the_same_student(tracking: MlflowClient, tmp_path: Path) -> None:
    """Across processes too (another interpreter, hash seed and thread pool): the run a user repeats."""
    weights, logits = _train_once(7)
    out = tmp_path / "child.npz"
    child = f"import numpy as np; from test_numerics import _train_once; w, l = _train_once(7); np.savez({str(out)!r}, logits=l, *w)"
    env = child_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'child.db'}", PYTHONHASHSEED="random")
    result = subprocess.run([sys.executable, "-c", child], cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out) as stored:
        assert np.array_equal(stored["logits"], logits)
        assert all(np.array_equal(stored[f"arr_{k}"], w) for k, w in enumerate(weights))


def test_a_model_with_nan_weights_never_answers_nan(tmp_path: Path, reliability) -> None:
    """A broken registered model (weights gone NaN) gets an error, HTTP 500, instead of NaN probabilities."""
    import base64
    import json
    from types import SimpleNamespace

    import pandas as pd
    from mlflow.exceptions import MlflowException
    from PIL import Image

    from registry.model import StudentClassifier

    student = build_student("tiny", SIZE, 2, seed=1)
    student.set_weights([np.full_like(w, np.nan) for w in student.get_weights()])
    student.save(tmp_path / "student.keras")
    (tmp_path / "metadata.json").write_text(json.dumps({"image_size": SIZE, "class_names": ["no", "yes"]}))
    served = StudentClassifier()
    served.load_context(
        SimpleNamespace(artifacts={"student": str(tmp_path / "student.keras"), "metadata": str(tmp_path / "metadata.json")})
    )
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)).save(buffer, format="PNG")
    with pytest.raises(MlflowException, match="non-finite probabilities") as error:
        served.predict(None, pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]}))
    assert error.value.error_code == "INTERNAL_ERROR"
    reliability.fault("a served model whose weights are NaN", "MlflowException INTERNAL_ERROR (HTTP 500), no NaN probability returned")
