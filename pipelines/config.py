"""One configuration object for every stage, and the thin CLI layer over it.

Every entry point (MLproject, ``python -m pipelines.<stage>``, tests) builds a :class:`Config`
and passes it down explicitly; nothing deeper reads globals or the environment, except MLflow's
own ``MLFLOW_TRACKING_URI`` which MLflow resolves itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class PipelineError(Exception):
    """A problem the user can fix (bad data, bad parameter): printed as one line, exit code 2."""


@dataclass
class Config:
    """Defaults for data, models, distillation and tracking. Field names are the CLI/MLproject names."""

    # data
    data_dir: str = field(default="", metadata={"help": "image folder, BraTS .h5 folder or CSV manifest; empty = embedded synthetic set"})
    image_size: int = field(default=64, metadata={"help": "square input size in pixels"})
    positive_class: str = field(default="", metadata={"help": "positive class for binary metrics; empty = detect (yes, tumor, ...)"})
    modality: str = field(default="flair", metadata={"help": "BraTS channel: flair, t1, t1ce, t2 or an index 0-3"})
    test_fraction: float = field(default=0.2, metadata={"help": "stratified hold-out fraction (ignored when the data has its own test split)"})
    folds: int = field(default=5, metadata={"help": "stratified group k-fold splits of the training part"})
    seed: int = field(default=42, metadata={"help": "seed for splits, initialisation and augmentation"})
    augment: bool = field(default=False, metadata={"help": "light augmentation (flip, rotation, zoom, shift, contrast); off by default: it lowered the student's F1 on the real set"})
    synthetic_images: int = field(default=300, metadata={"help": "size of the embedded synthetic set when data_dir is empty"})
    # optimisation
    epochs: int = field(default=60, metadata={"help": "maximum epochs per fold (early stopping on validation loss)"})
    patience: int = field(default=15, metadata={"help": "early-stopping patience in epochs"})
    batch_size: int = field(default=16, metadata={"help": "mini-batch size"})
    learning_rate: float = field(default=3e-3, metadata={"help": "Adam learning rate"})
    precision: str = field(default="float32", metadata={"help": "training arithmetic: float32, or bfloat16 (Keras mixed_bfloat16, float32 weights and logits); saved models are float32 either way"})
    # models
    teacher_arch: str = field(default="resnet", metadata={"help": "resnet (ours) or a keras.applications name, e.g. MobileNetV2"})
    teacher_weights: str = field(default="", metadata={"help": "local weights file for a keras.applications teacher; empty = random init"})
    student_size: str = field(default="small", metadata={"help": "tiny, small, medium, large or WIDTHxDEPTH, e.g. 24x3"})
    # distillation
    temperature: float = field(default=5.0, metadata={"help": "softmax temperature T"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the hard-label loss; 1 - alpha weighs the KD term"})
    teacher_mode: str = field(default="cached", metadata={"help": "cached (teacher logits computed once) or online (teacher forward pass every step)"})
    no_kd: bool = field(default=False, metadata={"help": "baseline: train the student on hard labels only (alpha = 1)"})
    fold: int = field(default=-1, metadata={"help": "train only this fold (0-based); -1 = all folds"})
    # search (Optuna)
    n_trials: int = field(default=20, metadata={"help": "finished (complete + pruned) trials the study should end with, over all workers"})
    study_name: str = field(default="kd-brain", metadata={"help": "Optuna study name"})
    storage: str = field(default="", metadata={"help": "Optuna RDB storage URL (sqlite:///... or postgresql://...); empty = optuna.db in the project"})
    objectives: str = field(default="f1", metadata={"help": "f1, or f1,params / f1,latency for a multi-objective search"})
    temperature_range: str = field(default="1,20", metadata={"help": "temperature search range (log scale)"})
    alpha_range: str = field(default="0,1", metadata={"help": "alpha search range"})
    width_range: str = field(default="8,32", metadata={"help": "student first-block width range (step 4)"})
    depth_range: str = field(default="2,4", metadata={"help": "student depth range"})
    learning_rate_range: str = field(default="5e-4,5e-3", metadata={"help": "learning-rate search range (log scale)"})
    heartbeat_interval: int = field(default=20, metadata={"help": "seconds between a running trial's heartbeats"})
    grace_period: int = field(default=60, metadata={"help": "seconds without a heartbeat before a trial counts as dead and is retried"})
    # registry
    model_name: str = field(default="brain-tumor-student", metadata={"help": "registered model name"})
    margin: float = field(default=0.0, metadata={"help": "hold-out F1 a new model must beat the champion by to be promoted"})
    force: bool = field(default=False, metadata={"help": "promote even if the gate refuses"})
    # tracking
    experiment_name: str = field(default="kd-brain", metadata={"help": "MLflow experiment"})
    tracking_wait_s: float = field(default=300.0, metadata={"help": "after a failure, how long to wait for an absent tracking server to mark the run FAILED"})
    cache_dir: str = field(default=str(PROJECT_ROOT / ".cache"), metadata={"help": "decoded images and the synthetic set"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values no stage could run with, naming the value and the fix."""
        checks = [
            (self.image_size >= 32, f"image_size={self.image_size}: use 32 or more"),
            (self.folds >= 2, f"folds={self.folds}: k-fold needs at least 2"),
            (0.0 < self.test_fraction < 0.5, f"test_fraction={self.test_fraction}: use a value in (0, 0.5)"),
            (self.epochs >= 1, f"epochs={self.epochs}: use 1 or more"),
            (self.batch_size >= 1, f"batch_size={self.batch_size}: use 1 or more"),
            (self.learning_rate > 0, f"learning_rate={self.learning_rate}: must be positive"),
            (self.precision in ("float32", "bfloat16"), f"precision={self.precision!r}: use 'float32' or 'bfloat16'"),
            (self.temperature > 0, f"temperature={self.temperature}: must be positive"),
            (0.0 <= self.alpha <= 1.0, f"alpha={self.alpha}: must be in [0, 1]"),
            (self.teacher_mode in ("cached", "online"), f"teacher_mode={self.teacher_mode!r}: use 'cached' or 'online'"),
            (self.fold >= -1 and self.fold < self.folds, f"fold={self.fold}: use -1 (all) or 0..{self.folds - 1}"),
            (self.synthetic_images >= 20, f"synthetic_images={self.synthetic_images}: use 20 or more"),
            (self.n_trials >= 1, f"n_trials={self.n_trials}: use 1 or more"),
            (self.objectives in ("f1", "f1,params", "f1,latency"), f"objectives={self.objectives!r}: use f1, f1,params or f1,latency"),
            (0 < self.heartbeat_interval < self.grace_period, f"heartbeat_interval={self.heartbeat_interval}, grace_period={self.grace_period}: need 0 < interval < grace period"),
        ]
        for ok, message in checks:
            if not ok:
                raise PipelineError(message)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{PROJECT_ROOT / 'optuna.db'}"

    @property
    def effective_alpha(self) -> float:
        """The no-KD baseline is plain hard-label training: alpha = 1."""
        return 1.0 if self.no_kd else self.alpha

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def as_params(self, names: Sequence[str]) -> dict[str, str]:
        """The named fields as MLflow params (strings, passwords in URLs hidden), the keys runs are matched on for reuse."""
        return {name: redact_url(str(getattr(self, name))) for name in names}


def redact_url(text: str) -> str:
    """A URL with its password replaced by ``***`` (``postgresql://user:***@host/db``); other text unchanged."""
    return re.sub(r"(://[^/:@\s]+:)[^@/\s]+@", r"\1***@", text)


# Parameters that decide a step's result; a finished run whose params and data digest match is reused.
# data_dir itself is not among them: the data digest identifies the data, wherever it is read from.
DATA_PARAMS = ("image_size", "positive_class", "modality", "test_fraction", "folds", "seed")
TRAIN_PARAMS = ("augment", "epochs", "patience", "batch_size", "learning_rate", "precision")
TEACHER_PARAMS = DATA_PARAMS + TRAIN_PARAMS + ("teacher_arch", "teacher_weights")
DISTILL_PARAMS = DATA_PARAMS + TRAIN_PARAMS + ("student_size", "temperature", "alpha", "teacher_mode", "no_kd", "fold")
SEARCH_PARAMS = DATA_PARAMS + TRAIN_PARAMS + ("teacher_arch", "teacher_weights", "teacher_mode", "n_trials", "study_name", "objectives") + (
    "temperature_range", "alpha_range", "width_range", "depth_range", "learning_rate_range")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true or false")


def _parse_int(text: str) -> int:
    """Integers, also as MLflow may render them ("5.0")."""
    value = float(text)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def build_parser(description: str, names: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose options are Config fields (``--data_dir`` and ``--data-dir`` both work)."""
    parser = argparse.ArgumentParser(description=description)
    defaults = Config()
    for f in fields(Config):
        if names is not None and f.name not in names:
            continue
        kind = {bool: _parse_bool, int: _parse_int, float: float}.get(type(getattr(defaults, f.name)), str)
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        parser.add_argument(*flags, dest=f.name, type=kind, default=getattr(defaults, f.name), help=f.metadata.get("help"))
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in known})
