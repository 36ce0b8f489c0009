"""The training-speed levers (issue 22) change how fast a model trains, never what it learns: fold workers give the
fold runs, metrics and reuse of one process; steps_per_execution stops early on the same epoch; the parallel
augmentation is reproducible from its seed; the learning-rate rules are the ones documented."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import keras
import mlflow
import numpy as np
import pytest
from kdtest import tiny_config, tracking_at
from mlflow import MlflowClient

from pipelines.config import TEACHER_PARAMS, Config, PipelineError
from pipelines.models.builders import build_student
from pipelines.models.distiller import Distiller
from pipelines.names import RunTag
from pipelines.steps.prepare import prepare_data
from pipelines.steps.teacher import train_teacher
from pipelines.training import compiled
from pipelines.training.fit import WarmupSchedule, fit, make_dataset, optimizer, peak_learning_rate


def teacher_run(client: MlflowClient, run_id: str):
    run = client.get_run(run_id)
    assert run.data.tags[RunTag.OUTCOME] == "trained"
    return run


@pytest.mark.slow
def test_two_fold_workers_give_the_fold_runs_metrics_and_reuse_of_one_process(mri_subset, tmp_path):
    cfg = tiny_config(mri_subset, tmp_path, folds=3, epochs=3, patience=3, augment=True)
    assert "fold_workers" not in TEACHER_PARAMS, "how many folds run at once decides nothing a run holds"
    prepared = prepare_data(cfg)
    results = {}
    for workers in (1, 2):
        with tracking_at(f"sqlite:///{tmp_path / f'workers-{workers}.db'}"):
            run_id = train_teacher(cfg.replace(fold_workers=workers), prepared)
            results[workers] = teacher_run(MlflowClient(), run_id)
    assert results[1].info.run_name == results[2].info.run_name == "teacher", "a step started alone is named after the step"
    one, two = results[1].data, results[2].data
    fold_keys = sorted(key for key in one.metrics if key.startswith("fold_"))
    assert fold_keys and fold_keys == sorted(key for key in two.metrics if key.startswith("fold_")), "every fold logged its epochs"
    for key in ("f1_mean", "f1_fold_0", "f1_fold_1", "f1_fold_2", "all_data_epochs", "teacher_params"):
        assert one.metrics[key] == pytest.approx(two.metrics[key], abs=0.02), key
    for k in range(3):
        history = [MlflowClient(f"sqlite:///{tmp_path / f'workers-{w}.db'}").get_metric_history(r.info.run_id, f"fold_{k}_val_loss")
                   for w, r in results.items()]  # fmt: skip
        assert [m.step for m in history[0]] == [m.step for m in history[1]], f"fold {k} trained the same epochs"
        assert np.allclose([m.value for m in history[0]], [m.value for m in history[1]], rtol=1e-3, atol=1e-4)
    assert one.tags[RunTag.PARAMS] == two.tags[RunTag.PARAMS] and one.tags[RunTag.CODE] == two.tags[RunTag.CODE]

    # A run trained one fold at a time is reused by a start with two workers, and the other way round.
    with tracking_at(f"sqlite:///{tmp_path / 'workers-1.db'}"):
        assert train_teacher(cfg.replace(fold_workers=2), prepared) == results[1].info.run_id
    with tracking_at(f"sqlite:///{tmp_path / 'workers-2.db'}"):
        assert train_teacher(cfg.replace(fold_workers=1), prepared) == results[2].info.run_id


def tiny_classifier(seed: int) -> Distiller:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 1), name="image")
    hidden = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(inputs))
    return Distiller(keras.Model(inputs, keras.layers.Dense(1)(hidden)), None, temperature=1.0, alpha=1.0, binary=True)


def noisy_task(rows: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Labels a tiny network fits quickly and then overfits: validation loss turns up after a few epochs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, rows)
    images = rng.normal(size=(rows, size, size, 1)).astype(np.float32) + labels[:, None, None, None] * 0.3
    return images, labels


@pytest.mark.parametrize("steps_per_execution", [3, 7])
def test_steps_per_execution_stops_early_on_the_same_epoch_with_the_same_metrics(tmp_path, steps_per_execution):
    images, labels = noisy_task(80, 0)
    val_images, val_labels = noisy_task(40, 1)
    outcomes = []
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        for spe in (1, steps_per_execution):
            cfg = Config(epochs=30, patience=2, batch_size=8, learning_rate=0.05, steps_per_execution=spe)
            trainer = tiny_classifier(3)
            train = make_dataset(images, labels, batch_size=8, shuffle=True, seed=4)  # 10 steps: the last call is partial
            validation = make_dataset(val_images, val_labels, batch_size=8)
            with mlflow.start_run() as run:
                best = fit(trainer, train, validation, cfg, prefix="", describe=f"spe {spe}")
            history = MlflowClient().get_metric_history(run.info.run_id, "val_loss")
            outcomes.append((best, [m.step for m in history], [m.value for m in history]))
    (best_one, epochs_one, losses_one), (best_many, epochs_many, losses_many) = outcomes
    assert len(epochs_one) < 30, "the task must make early stopping stop"
    assert best_one == best_many and epochs_one == epochs_many
    assert np.allclose(losses_one, losses_many, rtol=1e-4, atol=1e-5)


@dataclass
class Fitted:
    weights: list[np.ndarray]  # when its fit ended
    val_losses: list[float]
    compiled: object  # the compiled trainer it trained through
    student: keras.Model


def fit_in_a_new_thread(seeds: list[int], tmp_path) -> list[Fitted]:
    """Students of ``seeds`` fitted one after another in a thread of their own, whose compiled trainer starts empty."""
    images, labels = noisy_task(64, 0, size=32)
    val_images, val_labels = noisy_task(32, 1, size=32)
    cfg = Config(epochs=6, patience=2, batch_size=8, learning_rate=0.01)
    fitted = []

    def run() -> None:
        with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"), mlflow.start_run() as run:
            for seed in seeds:
                trainer = Distiller(build_student("4x2", 32, 2, seed=seed), None, temperature=1.0, alpha=1.0, binary=True)
                fit(trainer, make_dataset(images, labels, batch_size=8, shuffle=True, seed=seed),
                    make_dataset(val_images, val_labels, batch_size=8), cfg, prefix=f"seed_{seed}_", describe=f"seed {seed}")  # fmt: skip
                losses = [m.value for m in MlflowClient().get_metric_history(run.info.run_id, f"seed_{seed}_val_loss")]
                fitted.append(Fitted(trainer.student.get_weights(), losses, compiled._compiled.trainer, trainer.student))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(fitted) == len(seeds), "a fit ended with an error (see the log)"
    return fitted


def test_a_model_trained_through_the_last_fits_compiled_steps_ends_where_a_freshly_compiled_one_does(tmp_path):
    first, second = fit_in_a_new_thread([1, 2], tmp_path)
    [alone] = fit_in_a_new_thread([2], tmp_path)
    assert first.compiled is second.compiled, "the second student (same structure, other weights) trained through the first's steps"
    assert second.compiled is not second.student and alone.compiled is not first.compiled
    for when_fitted, now in zip(first.weights, first.student.get_weights()):
        np.testing.assert_array_equal(when_fitted, now, "training the second student changed the first")
    assert second.val_losses == pytest.approx(alone.val_losses, rel=1e-5, abs=1e-6), "the same validation losses, epoch by epoch"
    for reused, fresh in zip(second.weights, alone.weights):
        np.testing.assert_allclose(reused, fresh, rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(first.weights, second.weights)), "the two seeds trained different students"


def test_the_augmentation_is_reproducible_from_its_seed_and_changes_with_it_and_the_epoch():
    images = np.random.default_rng(0).normal(size=(12, 16, 16, 1)).astype(np.float32)
    labels = np.arange(12) % 2

    def epochs(seed: int) -> list[np.ndarray]:
        dataset = make_dataset(images, labels, batch_size=12, shuffle=True, augment=True, seed=seed)
        return [next(iter(dataset))[0]["image"].numpy() for _ in range(1)] + [
            batch[0]["image"].numpy() for _ in range(2) for batch in dataset
        ]

    first, again, other = epochs(5), epochs(5), epochs(6)
    one_at_a_time = [
        batch[0]["image"].numpy()
        for batch in make_dataset(images, labels, batch_size=12, shuffle=True, augment=True, seed=5, parallel=False)
    ]
    assert np.array_equal(one_at_a_time[0], first[0]), "views made in parallel are the views made one at a time"
    assert all(np.array_equal(a, b) for a, b in zip(first, again)), "the same seed gives the same augmented batches"
    assert not np.allclose(first[1], other[1]), "another seed, other views"
    assert not np.allclose(first[1], first[2]), "each epoch draws new views"
    plain = make_dataset(images, labels, batch_size=12, shuffle=False, augment=False)
    assert np.array_equal(next(iter(plain))[0]["image"].numpy(), images), "without augment the images pass unchanged"


def test_the_learning_rate_scales_with_the_batch_by_the_chosen_rule():
    assert peak_learning_rate(Config(batch_size=16, learning_rate=0.002)) == pytest.approx(0.002)
    assert peak_learning_rate(Config(batch_size=64, learning_rate=0.002)) == pytest.approx(0.004)  # sqrt(4)
    assert peak_learning_rate(Config(batch_size=64, learning_rate=0.002, lr_scaling="linear")) == pytest.approx(0.008)
    assert peak_learning_rate(Config(batch_size=64, learning_rate=0.002, lr_scaling="none")) == pytest.approx(0.002)
    with pytest.raises(PipelineError, match="lr_scaling='cube'"):
        Config(lr_scaling="cube")


def test_warm_up_rises_linearly_to_the_peak_and_cosine_ends_at_zero():
    schedule = WarmupSchedule(peak=1.0, warmup_steps=10, total_steps=110, cosine=True)
    rates = [float(schedule(step)) for step in range(110)]
    assert rates[0] == pytest.approx(0.1) and rates[4] == pytest.approx(0.5) and rates[9] == pytest.approx(1.0)
    assert rates[59] == pytest.approx(0.5, abs=0.02) and rates[-1] == pytest.approx(0.0, abs=1e-6)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])), "after warm-up the rate only falls"
    plain = optimizer(Config(learning_rate=0.003), steps_per_epoch=10, epochs=5)
    assert isinstance(plain, keras.optimizers.Adam) and math.isclose(float(plain.learning_rate), 0.003, rel_tol=1e-6)
    decayed = optimizer(Config(weight_decay=0.01, warmup_epochs=1), steps_per_epoch=10, epochs=5)
    assert isinstance(decayed, keras.optimizers.AdamW) and isinstance(decayed._learning_rate, WarmupSchedule)
