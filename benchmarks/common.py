"""What every part shares: the settings, the self-contained pipeline the parts measure, timing and targets."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import keras
import mlflow
import numpy as np

from pipelines.config import PROJECT_ROOT, Config, PipelineError
from pipelines.steps.prepare import Prepared, prepare_data
from pipelines.tracking.machine import describe_machine
from registry.report.document import data_label

REAL_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "brain-mri-yes-no"
# The larger scan set the F1 targets are judged on (see external_scans): folder -> the yes/no class it counts as.
EXTERNAL_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "brain-mri-4class"
EXTERNAL_CLASSES = {"notumor": "no", "glioma": "yes", "meningioma": "yes", "pituitary": "yes"}
EXPERIMENT = "kd-bench"
MODEL_NAME = "bench-student"
# Issue 16: the promoted student at least this many times smaller than its teacher (the search budget and part 3's target).
SIZE_RATIO = 20


@dataclass(frozen=True)
class Settings:
    """How much each part trains and measures; ``full`` must finish in about 25 minutes on 2 idle cores."""

    mode: str
    image_size: int
    per_class: int  # real scans per class; 0 = all of them
    folds: int
    epochs: int
    patience: int
    n_trials: int
    throughput_epochs: int  # timed epochs per variant, median taken (one more, untimed, traces the graph)
    latency_repeats: int
    serve_seconds: float  # per concurrency level
    clients: tuple[int, ...]
    scale_factors: tuple[int, ...]
    scale_sizes: tuple[int, ...]
    throughput_rows: int = 1024  # images per timed KD epoch in part 1 (fold 0's training rows repeated up to it)
    external_per_class: int = 600  # tumour and no-tumour scans each of the F1 targets' scan set (external_scans)


FULL = Settings("full", 64, 0, 3, 8, 3, 4, 3, 100, 10.0, (1, 4, 16), (1, 2, 4), (64, 128, 224))
SMOKE = Settings("smoke", 32, 12, 2, 2, 1, 1, 3, 20, 2.0, (1, 4, 16), (1, 2), (32, 40), throughput_rows=128, external_per_class=30)


@dataclass
class Bench:
    """The pipeline every part measures: data, the teachers' run and the work folder holding the stores."""

    settings: Settings
    cfg: Config
    work: Path
    tracking_uri: str
    prepared: Prepared
    teacher_run_id: str = ""
    version: str = ""  # the promoted Production version
    scans: dict = field(default_factory=dict)  # image size -> the F1 targets' scans (benchmarks.scans.f1_scans), read once


# Today's training settings: each speed lever's value before it existed (batch 16, one step per call, augmentation
# views one at a time, one fold at a time). The bench's own chain trains with them; part 7 measures the levers against them.
TODAY = {"batch_size": 16, "steps_per_execution": 1, "parallel_augment": False, "fold_workers": 1}


def resolve_data(settings: Settings, work: Path, data_dir: Path) -> str:
    """The real data folder (a per-class subset copied into ``work`` for smoke runs); smoke falls back to the synthetic set."""
    if not (data_dir / "yes").is_dir() or not (data_dir / "no").is_dir():
        if settings.mode == "smoke":
            print(f"bench: real data not found at {data_dir}; the smoke run uses the embedded synthetic set")
            return ""
        raise PipelineError(
            f"real data not found at {data_dir} (expected yes/ and no/ sub-folders); put the brain-mri-yes-no set there or pass --data_dir"
        )
    if not settings.per_class:
        return str(data_dir)
    subset = work / "data"
    for label in ("yes", "no"):
        (subset / label).mkdir(parents=True, exist_ok=True)
        for path in sorted((data_dir / label).iterdir())[: settings.per_class]:
            shutil.copy(path, subset / label / path.name)
    return str(subset)


def make_config(settings: Settings, work: Path, data_dir: str) -> Config:
    return Config(
        data_dir=data_dir,
        synthetic_images=40,
        image_size=settings.image_size,
        folds=settings.folds,
        epochs=settings.epochs,
        patience=settings.patience,
        n_trials=settings.n_trials,
        study_name="bench",
        storage=f"sqlite:///{work / 'optuna.db'}",
        model_name=MODEL_NAME,
        experiment_name=EXPERIMENT,
        cache_dir=str(work / "cache"),
        # The INT8-friendly student (BatchNorm folds into the convolutions) with quantization-aware training: what
        # issue 16's targets are about. The size budget is set from the teacher once the classes are known (open_bench).
        student_norm="batch",
        qat=True,
        **TODAY,  # part 7 runs the chain again with the fast settings
    )


def student_budget(cfg: Config, num_classes: int, times_smaller: int = SIZE_RATIO) -> int:
    """``max_params`` for a student at least ``times_smaller`` x smaller than ``cfg``'s teacher (counted, not assumed)."""
    from pipelines.models.builders import build_teacher

    return build_teacher(cfg.teacher_arch, cfg.teacher_size, num_classes).count_params() // times_smaller


def open_bench(settings: Settings, work: Path, data_dir: Path) -> Bench:
    """A fresh tracking store and study database in ``work`` (artifacts there too), and the prepared data."""
    work.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # children (search workers, the model server) use the same store
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=(work / "artifacts").as_uri())
    cfg = make_config(settings, work, resolve_data(settings, work, data_dir))
    prepared = prepare_data(cfg)
    cfg = cfg.replace(max_params=student_budget(cfg, prepared.dataset.num_classes))
    return Bench(settings, cfg, work, tracking_uri, prepared)


def compute_device() -> str:
    """What TensorFlow trains and infers on here: ``GPU: <name>[, <name>]`` or ``CPU only`` (the same code runs on either;
    ``pip install -e .[gpu]`` brings TensorFlow's CUDA libraries)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU only"
    return "GPU: " + ", ".join(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus)


def header(settings: Settings, cfg: Config) -> dict[str, object]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": compute_device(),
        "machine": describe_machine(),
        "settings": asdict(settings),
        "config": {
            # the data named as generated documents name it (relative to the project), never by this machine's path
            name: data_label(cfg.data_dir) if name == "data_dir" else getattr(cfg, name)
            for name in (
                "data_dir",
                "image_size",
                "folds",
                "epochs",
                "patience",
                "batch_size",
                "n_trials",
                "teacher_arch",
                "student_size",
                "student_norm",
                "qat",
                "max_params",
                "serving_format",
                "temperature",
                "alpha",
                "seed",
            )
        },
    }


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN where the denominator is not a positive measurement."""
    return float(numerator / denominator) if denominator > 0 else float("nan")


def target(description: str, value: float, threshold: float, at_least: bool = True, why: str = "") -> dict[str, object]:
    """One target with its measured value: met when value >= threshold (or <= where ``at_least`` is False).

    ``why``: where a target is measured differently from how it was first defined, the reason (the report prints it
    under the targets table, so a changed definition is never silent)."""
    met = bool(value >= threshold) if at_least else bool(value <= threshold)
    return {
        "target": description,
        "value": float(value),
        "threshold": float(threshold),
        "comparison": ">=" if at_least else "<=",
        "met": met and bool(np.isfinite(value)),
        **({"why": why} if why else {}),
    }


class EpochTimer(keras.callbacks.Callback):
    """Wall time of every epoch, so graph tracing in the first one can be left out."""

    def on_train_begin(self, logs=None):
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
