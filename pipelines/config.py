"""One configuration object for every stage, and the thin CLI layer over it.

Every entry point (MLproject, ``kd <command>``, tests) builds a :class:`Config`
and passes it down explicitly; nothing deeper reads globals or the environment, except MLflow's
own ``MLFLOW_TRACKING_URI`` which MLflow resolves itself, and ``KD_STORAGE_URL``, the study's storage
URL when the ``storage`` parameter is empty (the place for a URL with a password: parameters are logged).

This module imports nothing heavy: every entry point checks its whole configuration here, in a fraction
of a second, before TensorFlow, the data or the stores are loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEDUPE_MODES = ("drop", "keep", "error")  # what prepare does with hold-out images that duplicate training images
KD_MODES = ("standard", "consistent")
# The student's normalisation: GroupNorm (default), BatchNorm (folds into the convolutions: an all-INT8 TFLite graph)
# or none (a bias instead).
STUDENT_NORMS = ("group", "batch", "none")
# How the promoted model's network runs when served (registry/model.py); auto: promote picks the fastest whose
# hold-out F1 is within SERVING_F1_TOLERANCE of the Keras student's.
SERVING_FORMATS = ("auto", "keras", "tflite-float32", "tflite-int8")
SERVING_F1_TOLERANCE = 0.005
LR_SCALINGS = ("sqrt", "linear", "none")
LR_SCHEDULES = ("constant", "cosine")
# How promote calibrates the probabilities a version serves (pipelines/calibration.py): one temperature fitted on
# out-of-fold validation logits, or none.
CALIBRATIONS = ("temperature", "none")
# Resamples of the percentile bootstrap behind every 95 % interval (the report's hold-out figures, kd evaluate's).
BOOTSTRAP_RESAMPLES = 1000


class PipelineError(Exception):
    """A problem the user can fix (bad data, bad parameter): printed as one line, exit code 2."""


STORAGE_URL_ENV = "KD_STORAGE_URL"
BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
# (width of the first block, number of blocks); widths double per block.
STUDENT_PRESETS = {"tiny": (8, 2), "small": (16, 3), "medium": (24, 3), "large": (32, 4)}
MAX_STUDENT_WIDTH, MAX_STUDENT_DEPTH = 512, 6


@dataclass(frozen=True)
class Limits:
    """The allowed values of a numeric parameter; ``low_open``/``high_open`` exclude that end."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        return (
            math.isfinite(value)
            and (self.low < value if self.low_open else self.low <= value)
            and (value < self.high if self.high_open else value <= self.high)
        )

    def __str__(self) -> str:
        low, high = (f"{int(end)}" if float(end).is_integer() else f"{end:g}" for end in (self.low, self.high))
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


# Every numeric parameter's range, checked at start-up and shown in --help. Sizes are capped where a larger
# value would exhaust memory or time long before it could help (image_size 100000 died in PIL's resize).
LIMITS = {
    "image_size": Limits(32, 512),
    "teacher_image_size": Limits(0, 512),  # 0 = image_size; otherwise image_size's own range (checked in validate)
    "test_fraction": Limits(0, 0.5, low_open=True, high_open=True),
    "folds": Limits(2, 20),
    "repeats": Limits(1, 10),
    "seed": Limits(0, 2**32 - 1),  # numpy's seed range
    "synthetic_images": Limits(20, 10_000),
    "synthetic_classes": Limits(2, 4),  # 2: tumor/normal; 3: glioma, meningioma, notumor; 4: + pituitary
    "epochs": Limits(1, 1000),
    "patience": Limits(0, 1000),
    "batch_size": Limits(1, 1024),
    "warmup_epochs": Limits(0, 100),
    "weight_decay": Limits(0, 1),
    "steps_per_execution": Limits(1, 10_000),
    "fold_workers": Limits(1, 64),
    "learning_rate": Limits(0, 1, low_open=True),
    "temperature": Limits(0, 100, low_open=True),
    "alpha": Limits(0, 1),
    "fold": Limits(-1, 20 * 10 - 1),  # a fold entry of the largest folds x repeats; validate checks it against this config's
    "n_trials": Limits(1, 10_000),
    "heartbeat_interval": Limits(1, 3600),
    "grace_period": Limits(2, 86_400),
    "margin": Limits(-1, 1),
    "tracking_wait_s": Limits(0, 3600),
    "kd_views": Limits(1, 64),
    "teacher_seed_offset": Limits(0, 1_000_000),
    "max_params": Limits(0, 1_000_000_000),  # 0 = no limit
    "max_latency_ms": Limits(0, 60_000),  # 0 = no limit
}
# The search ranges (low,high text) and the parameter whose limits their ends must respect; log scale ones positive.
RANGE_LIMITS = {
    "temperature_range": (LIMITS["temperature"], float, True),
    "alpha_range": (LIMITS["alpha"], float, False),
    "width_range": (Limits(1, MAX_STUDENT_WIDTH), int, True),
    "depth_range": (Limits(1, MAX_STUDENT_DEPTH), int, True),
    "learning_rate_range": (LIMITS["learning_rate"], float, True),
}


def parse_range(name: str, text: str, cast=float, positive: bool = False, limits: Limits | None = None) -> tuple:
    """``low,high`` -> (low, high), refused with the parameter's name when malformed, empty or out of limits."""
    try:
        low, high = (cast(part) for part in text.split(","))
    except ValueError:
        raise PipelineError(f"{name}={text!r}: give two numbers, low,high") from None
    if low > high:
        raise PipelineError(f"{name}={text!r}: empty range (low > high)")
    if positive and low <= 0:
        raise PipelineError(f"{name}={text!r}: a log-scale range must be positive")
    if limits is not None and (low not in limits or high not in limits):
        raise PipelineError(f"{name}={text!r}: both ends must lie in {limits}")
    return low, high


TEACHER_SIZES = ("S", "M", "L")


def parse_teacher(spec: str) -> tuple[str, str]:
    """``resnet``, ``hybrid:L`` or a ``keras.applications`` name -> (architecture, size); our teachers default to M."""
    arch, colon, size = spec.strip().partition(":")
    if arch in ("resnet", "hybrid"):
        size = size if colon else "M"
        if size not in TEACHER_SIZES:
            raise PipelineError(f"teacher_arch={spec!r}: sizes are {', '.join(TEACHER_SIZES)} (e.g. {arch}:L)")
    elif colon:
        raise PipelineError(f"teacher_arch={spec!r}: only resnet and hybrid take a size; keras.applications names come without one")
    return arch, size


def parse_teachers(spec: str) -> list[tuple[str, str]]:
    """``resnet:L,hybrid:S`` -> one (architecture, size) per ensemble member (:func:`parse_teacher` each); one for a single teacher.

    An architecture may repeat (``resnet,resnet``): the repeats are further seeds of it (:func:`teacher_members`).
    """
    members = spec.split(",")
    if any(not member.strip() for member in members):
        raise PipelineError(f"teacher_arch={spec!r}: an empty ensemble member; list teachers as resnet,hybrid:S")
    return [parse_teacher(member) for member in members]


# Ensemble members that repeat an architecture (``resnet,resnet``) are further seeds of it, this far apart.
MEMBER_SEED_STRIDE = 1000


def teacher_members(cfg: Config) -> list[Config]:
    """One single-teacher Config per member of ``cfg.teacher_arch``: its own architecture, and its own
    ``teacher_seed_offset`` when it repeats an earlier member (the first ``resnet`` of ``resnet,resnet`` is the plain
    ``resnet`` teacher, reused as such; the second trains from other seeds). Data, splits and views stay ``cfg``'s.
    """
    specs = parse_teachers(cfg.teacher_arch)
    if len(specs) == 1:  # a single teacher is its own only member, as given
        return [cfg]
    seen: dict[tuple[str, str], int] = {}
    members = []
    for spec, parsed in zip(cfg.teacher_arch.split(","), specs):
        repeat = seen.get(parsed, 0)
        seen[parsed] = repeat + 1
        members.append(cfg.replace(teacher_arch=spec.strip(), teacher_seed_offset=cfg.teacher_seed_offset + repeat * MEMBER_SEED_STRIDE))
    return members


def teacher_choices(cfg: Config) -> tuple[str, ...]:
    """The teachers a search chooses among (``teacher_choices``, each a ``teacher_arch``, checked), or ``teacher_arch`` alone."""
    if not cfg.teacher_choices.strip():
        return (cfg.teacher_arch,)
    choices = tuple(choice.strip() for choice in cfg.teacher_choices.split("/"))
    if not all(choices):
        raise PipelineError(f"teacher_choices={cfg.teacher_choices!r}: an empty choice; separate teachers by single '/'")
    parsed = [tuple(parse_teachers(choice)) for choice in choices]
    if len(set(parsed)) < len(parsed):
        raise PipelineError(f"teacher_choices={cfg.teacher_choices!r}: a teacher is listed twice (hybrid and hybrid:M are the same)")
    return choices


def parse_list(name: str, text: str) -> list[str]:
    """A comma list of one parameter (``teachers``, ``students``, ``imbalance``): its stripped entries, none empty."""
    entries = [entry.strip() for entry in text.split(",")]
    if not all(entries):
        raise PipelineError(f"{name}={text!r}: an empty entry; separate entries by single commas (e.g. resnet:S,hybrid:S)")
    if len(set(entries)) < len(entries):
        raise PipelineError(f"{name}={text!r}: an entry is listed twice")
    return entries


def parse_ratios(text: str) -> list[str]:
    """``imbalance`` -> its ratios as given (``0,4,10``): each 0 (the data as it is) or a number >= 1 (minority 1:r of the majority)."""
    ratios = parse_list("imbalance", text)
    for ratio in ratios:
        try:
            value = float(ratio)
        except ValueError:
            value = math.nan
        if not (value == 0 or (math.isfinite(value) and value >= 1)):
            raise PipelineError(f"imbalance={text!r}: {ratio!r} is not a ratio; use 0 (data as it is) or a number >= 1, e.g. 0,4,10")
    return ratios


def parse_class_map(text: str) -> dict[str, str]:
    """``class_map`` (``data:model,...``) as {data class: model class}; a data class may be listed once, several data
    classes may map to one model class (``glioma:yes,meningioma:yes,notumor:no``)."""
    mapping: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        source, colon, target = (side.strip() for side in entry.partition(":"))
        if not colon or not source or not target:
            raise PipelineError(f"class_map={text!r}: {entry!r} is not data_class:model_class; e.g. class_map=tumour:yes,healthy:no")
        if source in mapping:
            raise PipelineError(f"class_map={text!r}: data class {source!r} is mapped twice")
        mapping[source] = target
    return mapping


def parse_student_size(size: str) -> tuple[int, int]:
    """``small`` or ``24x3`` -> (width, depth)."""
    if size in STUDENT_PRESETS:
        return STUDENT_PRESETS[size]
    match = re.fullmatch(r"(\d+)x(\d+)", size.strip())
    if not match or not (1 <= int(match.group(1)) <= MAX_STUDENT_WIDTH and 1 <= int(match.group(2)) <= MAX_STUDENT_DEPTH):
        raise PipelineError(
            f"student_size={size!r}: use {', '.join(STUDENT_PRESETS)} or WIDTHxDEPTH with width 1-{MAX_STUDENT_WIDTH} and depth "
            f"1-{MAX_STUDENT_DEPTH} (e.g. 24x3)"
        )
    return int(match.group(1)), int(match.group(2))


def modality_index(modality: str) -> int:
    """A BraTS channel by name or index (``flair`` or ``0``)."""
    name = modality.strip().lower()
    if name.isdigit() and int(name) < len(BRATS_MODALITIES):
        return int(name)
    if name in BRATS_MODALITIES:
        return BRATS_MODALITIES.index(name)
    raise PipelineError(f"modality={modality!r}: use one of {', '.join(BRATS_MODALITIES)} or an index 0-3")


def has_password(url: str) -> bool:
    """Whether a URL carries a password (``user:pw@``, ``:pw@`` or a ``password=`` query parameter)."""
    return bool(re.search(r"://[^/@\s]*:[^@/\s]+@", url) or re.search(r"[?&]password=", url, re.IGNORECASE))


def check_storage_parameter(url: str) -> None:
    """Refuse a storage URL with a password: parameters are logged and printed (``mlflow run`` shows them)."""
    if has_password(url):
        raise PipelineError(
            f"storage={redact_url(url)}: a password in the URL would be stored with the run's parameters; drop it and use PGPASSWORD "
            f"or ~/.pgpass, or put the whole URL in the environment variable {STORAGE_URL_ENV} and leave storage empty"
        )


# The reuse keys a Config field can belong to: "data", what one process's prepared-data cache is keyed on
# (pipelines.prepare), and each step whose finished runs are reused. Every field names its keys in its metadata
# ("reuse", () for a field that decides no trained result): a new field cannot be left out of a key by forgetting a
# list, and a test fails on a field that names none.
REUSE_KEYS = ("data", "prepare", "teacher", "distill", "search", "compare")
ALL_KEYS = REUSE_KEYS  # what decides the prepared data decides every step after it
SOURCE_KEYS = ("data",)  # where the data comes from: run keys identify the data by its digest instead
TRAINING_KEYS = ("teacher", "distill", "search", "compare")  # how networks are trained


@dataclass
class Config:
    """Defaults for data, models, distillation and tracking. Field names are the CLI/MLproject names."""

    # data
    data_dir: str = field(
        default="",
        metadata={"reuse": SOURCE_KEYS, "help": "image folder, BraTS .h5 folder or CSV manifest; empty = embedded synthetic set"},
    )
    image_size: int = field(default=64, metadata={"reuse": ALL_KEYS, "help": "square input size in pixels"})
    positive_class: str = field(
        default="", metadata={"reuse": ALL_KEYS, "help": "positive class for binary metrics; empty = detect (yes, tumor, ...)"}
    )
    modality: str = field(
        default="flair",
        metadata={
            "reuse": ALL_KEYS,
            "help": "BraTS channel (.h5) or NIfTI file (<case>_<modality>.nii.gz): flair, t1, t1ce, t2 or an index 0-3",
        },
    )
    test_fraction: float = field(
        default=0.2, metadata={"reuse": ALL_KEYS, "help": "stratified hold-out fraction (ignored when the data has its own test split)"}
    )
    folds: int = field(default=5, metadata={"reuse": ALL_KEYS, "help": "stratified group k-fold splits of the training part"})
    repeats: int = field(
        default=1,
        metadata={
            "reuse": ALL_KEYS,
            "help": (
                "repetitions of the k-fold with new seeds (same hold-out): folds x repeats validation folds, numbered "
                "k = repeat x folds + fold, for the corrected resampled t-test of KD vs no-KD"
            ),
        },
    )
    seed: int = field(default=42, metadata={"reuse": ALL_KEYS, "help": "seed for splits, initialisation and augmentation"})
    augment: bool = field(
        default=False,
        metadata={
            "reuse": TRAINING_KEYS,
            "help": (
                "light augmentation (flip, rotation, zoom, shift, contrast); off by default: it lowered the student's F1 on the real set"
            ),
        },
    )
    dedupe: str = field(
        default="drop",
        metadata={
            "reuse": ALL_KEYS,
            "help": (
                "hold-out images that duplicate training images (given Testing/ split), and evaluate's images the version already "
                "saw: drop, keep or error"
            ),
        },
    )
    synthetic_images: int = field(
        default=300, metadata={"reuse": SOURCE_KEYS, "help": "size of the embedded synthetic set when data_dir is empty"}
    )
    synthetic_classes: int = field(
        default=2,
        metadata={
            "reuse": SOURCE_KEYS,
            "help": "classes of the embedded synthetic set: 2 (tumor/normal), 3 (glioma, meningioma, notumor) or 4 (+ pituitary)",
        },
    )
    # optimisation
    epochs: int = field(
        default=60, metadata={"reuse": TRAINING_KEYS, "help": "maximum epochs per fold (early stopping on validation loss)"}
    )
    patience: int = field(default=15, metadata={"reuse": TRAINING_KEYS, "help": "early-stopping patience in epochs"})
    batch_size: int = field(default=16, metadata={"reuse": TRAINING_KEYS, "help": "mini-batch size"})
    lr_scaling: str = field(
        default="sqrt",
        metadata={
            "reuse": TRAINING_KEYS,
            "help": (
                "how learning_rate (given for batches of 16) scales with batch_size: sqrt (the rule for Adam), linear or none "
                "(learning_rate as given)"
            ),
        },
    )
    warmup_epochs: float = field(
        default=0.0, metadata={"reuse": TRAINING_KEYS, "help": "epochs of linear learning-rate warm-up at the start of training"}
    )
    lr_schedule: str = field(
        default="constant",
        metadata={"reuse": TRAINING_KEYS, "help": "after warm-up: constant, or cosine (decay to 0 at the last of epochs)"},
    )
    weight_decay: float = field(default=0.0, metadata={"reuse": TRAINING_KEYS, "help": "decoupled weight decay (AdamW) when > 0; 0 = Adam"})
    parallel_augment: bool = field(
        default=True,
        metadata={"reuse": (), "help": "make the augmented views on every core (the same views as one at a time: stateless)"},
    )
    steps_per_execution: int = field(
        default=1,
        metadata={
            "reuse": (),
            "help": "training steps per call of the compiled step (fewer Python dispatches); per-epoch metrics, early stopping as with 1",
        },
    )
    fold_workers: int = field(
        default=1,
        metadata={
            "reuse": (),
            "help": (
                "folds trained at once, each in its own process with cores / fold_workers threads (same runs and metrics as 1, "
                "within float tolerance)"
            ),
        },
    )
    learning_rate: float = field(default=3e-3, metadata={"reuse": TRAINING_KEYS, "help": "Adam learning rate"})
    precision: str = field(
        default="float32",
        metadata={
            "reuse": TRAINING_KEYS,
            "help": (
                "training arithmetic: float32, or bfloat16 (Keras mixed_bfloat16, float32 weights and logits); saved models are "
                "float32 either way"
            ),
        },
    )
    # models
    teacher_arch: str = field(
        default="resnet",
        metadata={
            "reuse": ("teacher", "distill", "search"),
            "help": (
                "resnet or hybrid (ours; :S, :M or :L: size, default M) or a keras.applications name; a comma list (resnet:L,hybrid:S) "
                "is an ensemble: the student distils from the mean of its members' logits"
            ),
        },
    )
    teacher_seed_offset: int = field(
        default=0,
        metadata={
            "reuse": TRAINING_KEYS,
            "help": (
                "added to seed for the teacher's initialisation, shuffling and augmentation (splits and views keep seed); a repeated "
                "ensemble member (resnet,resnet) adds 1000 per repeat"
            ),
        },
    )
    teacher_weights: str = field(
        default="", metadata={"reuse": TRAINING_KEYS, "help": "local weights file for a keras.applications teacher; empty = random init"}
    )
    teacher_image_size: int = field(
        default=0,
        metadata={
            "reuse": TRAINING_KEYS,
            "help": (
                "the teacher's input size in pixels, 0 = image_size; a larger one lets a high-resolution teacher guide a low-resolution "
                "student through cached logits (keyed by image), at no cost to the student"
            ),
        },
    )
    student_size: str = field(
        default="small", metadata={"reuse": ("distill",), "help": "tiny, small, medium, large or WIDTHxDEPTH, e.g. 24x3"}
    )
    student_norm: str = field(
        default="group",
        metadata={
            "reuse": ("distill", "search"),
            "help": (
                "the student's normalisation: group (GroupNorm, no INT8 kernel: the INT8 export falls back to float around it), batch "
                "(BatchNorm, statistics recomputed on the training images after training, folded into the convolutions for INT8) or "
                "none; batch and none export to an all-integer TFLite graph"
            ),
        },
    )
    qat: bool = field(
        default=False,
        metadata={
            "reuse": ("distill",),
            "help": (
                "quantization-aware training: fine-tune the distilled student with fake-quantized weights (per channel) and activations "
                "under the same KD loss, and keep that model for the INT8 export; needs student_norm=batch or none"
            ),
        },
    )
    # distillation
    temperature: float = field(default=5.0, metadata={"reuse": ("distill", "compare"), "help": "softmax temperature T"})
    alpha: float = field(
        default=0.5, metadata={"reuse": ("distill", "compare"), "help": "weight of the hard-label loss; 1 - alpha weighs the KD term"}
    )
    teacher_mode: str = field(
        default="cached",
        metadata={
            "reuse": ("distill", "search", "compare"),
            "help": "cached (teacher logits computed once) or online (teacher forward pass every step)",
        },
    )
    kd_mode: str = field(
        default="standard",
        metadata={
            "reuse": TRAINING_KEYS,
            "help": (
                "standard: the student's augmented image, the teacher's logits of the plain one (cached); consistent (Beyer et al. 2022): "
                "teacher and student see the same augmented view, always augmented: online, every step's fresh views mixed by mixup; "
                "cached, kd_views fixed views per image without mixup (logits of mixed images cannot be cached)"
            ),
        },
    )
    kd_views: int = field(
        default=8,
        metadata={
            "reuse": TRAINING_KEYS,
            "help": "augmented views per image the teacher's logits are cached for (kd_mode=consistent, cached)",
        },
    )
    no_kd: bool = field(
        default=False, metadata={"reuse": ("distill",), "help": "baseline: train the student on hard labels only (alpha = 1)"}
    )
    # imbalance (any step) and the comparison (compare)
    imbalance: str = field(
        default="0",
        metadata={
            "reuse": ALL_KEYS,
            "help": (
                "minority:majority ratio r of the training folds: 0 = the data as it is; r >= 1 keeps ceil(majority / r) minority "
                "images in each fold's training rows (validation folds and hold-out untouched); compare takes a comma list (0,4,10)"
            ),
        },
    )
    minority_class: str = field(
        default="",
        metadata={
            "reuse": ALL_KEYS,
            "help": "the class imbalance subsamples and minority metrics are of; empty = the fewest training images",
        },
    )
    teachers: str = field(
        default="resnet:S,hybrid:S",
        metadata={"reuse": ("compare",), "help": "compare: the teachers, a comma list of teacher_arch values (resnet:S,resnet:L,...)"},
    )
    students: str = field(
        default="tiny,small", metadata={"reuse": ("compare",), "help": "compare: the student sizes, a comma list (tiny,small,24x3)"}
    )
    comparison_name: str = field(
        default="kd-comparison", metadata={"reuse": ("compare",), "help": "compare: the comparison's name (its run's kd.comparison tag)"}
    )
    fold: int = field(
        default=-1,
        metadata={"reuse": ("distill",), "help": "train only this fold entry (0-based, up to folds x repeats - 1); -1 = all of them"},
    )
    # search (Optuna)
    n_trials: int = field(
        default=20,
        metadata={
            "reuse": ("search",),
            "help": "finished (complete + pruned) trials the study should end with, over all workers (students over the budget apart)",
        },
    )
    study_name: str = field(default="kd-brain", metadata={"reuse": ("search",), "help": "Optuna study name"})
    storage: str = field(
        default="",
        metadata={"reuse": (), "help": "Optuna RDB storage URL (sqlite:///... or postgresql://...); empty = optuna.db in the project"},
    )
    objectives: str = field(
        default="f1", metadata={"reuse": ("search",), "help": "f1, or f1,params / f1,latency for a multi-objective search"}
    )
    temperature_range: str = field(default="1,20", metadata={"reuse": ("search",), "help": "temperature search range (log scale)"})
    alpha_range: str = field(default="0,1", metadata={"reuse": ("search",), "help": "alpha search range"})
    width_range: str = field(default="8,32", metadata={"reuse": ("search",), "help": "student first-block width range (step 4)"})
    depth_range: str = field(default="2,4", metadata={"reuse": ("search",), "help": "student depth range"})
    learning_rate_range: str = field(default="5e-4,5e-3", metadata={"reuse": ("search",), "help": "learning-rate search range (log scale)"})
    teacher_choices: str = field(
        default="",
        metadata={
            "reuse": ("search",),
            "help": (
                "teachers the search chooses among, separated by '/' (resnet/hybrid:S/resnet,hybrid: a comma list is one "
                "ensemble choice); empty = teacher_arch alone"
            ),
        },
    )
    max_params: int = field(
        default=0,
        metadata={
            "reuse": ("search",),
            "help": (
                "the student's parameter budget: a trial whose student has more is skipped before training and never promoted; 0 = no limit"
            ),
        },
    )
    max_latency_ms: float = field(
        default=0.0,
        metadata={
            "reuse": ("search",),
            "help": (
                "the student's latency budget: median ms of one image through the Keras model on the machine that runs the trial "
                "(machine-dependent: search on the hardware it is for); over it, a trial is skipped before training; 0 = no limit"
            ),
        },
    )
    heartbeat_interval: int = field(default=20, metadata={"reuse": (), "help": "seconds between a running trial's heartbeats"})
    grace_period: int = field(
        default=60, metadata={"reuse": (), "help": "seconds without a heartbeat before a trial counts as dead and is retried"}
    )
    # registry
    model_name: str = field(default="brain-tumor-student", metadata={"reuse": (), "help": "registered model name"})
    margin: float = field(default=0.0, metadata={"reuse": (), "help": "hold-out F1 a new model must beat the champion by to be promoted"})
    force: bool = field(default=False, metadata={"reuse": (), "help": "promote even if the gate refuses"})
    comparison: str = field(
        default="",
        metadata={
            "reuse": (),
            "help": (
                "report: the KD comparison whose tables to include, by run id or name (its newest finished run); empty = the newest "
                "finished comparison on the reported version's data, if any"
            ),
        },
    )
    serving_format: str = field(
        default="auto",
        metadata={
            "reuse": (),
            "help": (
                "how the registered model runs when served: keras, tflite-float32 or tflite-int8; auto = the fastest at batch 1 whose "
                f"hold-out F1 is within {SERVING_F1_TOLERANCE} of the Keras student's"
            ),
        },
    )
    calibration: str = field(
        default="temperature",
        metadata={
            "reuse": (),
            "help": (
                "promote: temperature = divide each model's logits by one temperature fitted (minimum NLL) on its out-of-fold "
                "validation logits, never the hold-out; the served model and every TFLite format then return calibrated "
                "probabilities, labels unchanged; none = the probabilities as trained"
            ),
        },
    )
    # external validation (kd evaluate) and localisation (promote, kd explain)
    class_map: str = field(
        default="",
        metadata={
            "help": (
                "evaluate: rename the data's classes to the model's, data_class:model_class,... (several may map to one, e.g. "
                "glioma:yes,meningioma:yes,notumor:no); the others must match by name"
            ),
            "reuse": (),
        },
    )
    boxes_dir: str = field(
        default="",
        metadata={
            "help": (
                "promote, explain: a folder of tumour scans with YOLO box files (<scan>.txt beside each), for the Grad-CAM pointing "
                "game of student and teacher against the centre and brightest-pixel baselines; empty = none"
            ),
            "reuse": (),
        },
    )
    # tracking
    experiment_name: str = field(default="kd-brain", metadata={"reuse": (), "help": "MLflow experiment"})
    tracking_wait_s: float = field(
        default=300.0,
        metadata={"reuse": (), "help": "after a failure, how long to wait for an absent tracking server to mark the run FAILED"},
    )
    cache_dir: str = field(default=str(PROJECT_ROOT / ".cache"), metadata={"reuse": (), "help": "decoded images and the synthetic set"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values no stage could run with, naming the value and the fix: the whole configuration, before
        any stage imports TensorFlow or touches the data or a store."""
        for name, limits in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in limits:
                raise PipelineError(f"{name}={value!r}: out of range; use a value in {limits}")
        for name, (limits, cast, positive) in RANGE_LIMITS.items():
            parse_range(name, getattr(self, name), cast, positive, limits)
        parse_student_size(self.student_size)
        parse_teachers(self.teacher_arch)
        for name, parse in (("students", parse_student_size), ("teachers", parse_teacher)):
            for entry in parse_list(name, getattr(self, name)):
                try:
                    parse(entry)
                except PipelineError as error:
                    raise PipelineError(f"{name}={getattr(self, name)!r}: {error}") from None
        parse_ratios(self.imbalance)
        teacher_choices(self)
        parse_class_map(self.class_map)
        modality_index(self.modality)
        check_storage_parameter(self.storage)
        checks = [
            (self.precision in ("float32", "bfloat16"), f"precision={self.precision!r}: use 'float32' or 'bfloat16'"),
            (self.lr_scaling in LR_SCALINGS, f"lr_scaling={self.lr_scaling!r}: use {', '.join(LR_SCALINGS)}"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule={self.lr_schedule!r}: use {', '.join(LR_SCHEDULES)}"),
            (self.teacher_mode in ("cached", "online"), f"teacher_mode={self.teacher_mode!r}: use 'cached' or 'online'"),
            (self.kd_mode in KD_MODES, f"kd_mode={self.kd_mode!r}: use {' or '.join(KD_MODES)}"),
            (self.student_norm in STUDENT_NORMS, f"student_norm={self.student_norm!r}: use {', '.join(STUDENT_NORMS)}"),
            (
                not self.qat or self.student_norm != "group",
                "qat=true with student_norm=group: GroupNorm has no INT8 kernel, so its export cannot be all-integer; use "
                "student_norm=batch or student_norm=none",
            ),
            (
                self.teacher_image_size == 0 or self.teacher_image_size in LIMITS["image_size"],
                f"teacher_image_size={self.teacher_image_size}: use 0 (the student's image_size) or a size in {LIMITS['image_size']}",
            ),
            (
                self.teacher_mode == "cached" or self.teacher_size == self.image_size,
                f"teacher_mode=online with teacher_image_size={self.teacher_image_size} and image_size={self.image_size}: an online "
                "teacher sees the student's batch, at image_size; use teacher_mode=cached (the teacher's logits are "
                "computed once at its own size) or teacher_image_size=0",
            ),
            (
                self.fold >= -1 and self.fold < self.fold_count,
                f"fold={self.fold}: use -1 (all) or 0..{self.fold_count - 1} (folds x repeats = {self.folds} x {self.repeats})",
            ),
            (self.dedupe in DEDUPE_MODES, f"dedupe={self.dedupe!r}: use {', '.join(DEDUPE_MODES)}"),
            (
                not self.boxes_dir or Path(self.boxes_dir).expanduser().is_dir(),
                f"boxes_dir={self.boxes_dir!r} is not a folder; give a folder of scans with their YOLO box files (scan.jpg + scan.txt)",
            ),
            (
                not re.search(r"['\"`\\]", self.comparison),  # it is quoted in an MLflow search filter
                f"comparison={self.comparison!r}: a comparison name or run id has no quotes or backslashes; give it without them",
            ),
            (self.serving_format in SERVING_FORMATS, f"serving_format={self.serving_format!r}: use {', '.join(SERVING_FORMATS)}"),
            (self.calibration in CALIBRATIONS, f"calibration={self.calibration!r}: use {' or '.join(CALIBRATIONS)}"),
            (
                re.fullmatch(r"[\w.:-]+", self.comparison_name) is not None,
                f"comparison_name={self.comparison_name!r}: use letters, digits and _ . : - (it names runs and locks)",
            ),
            (self.objectives in ("f1", "f1,params", "f1,latency"), f"objectives={self.objectives!r}: use f1, f1,params or f1,latency"),
            (
                0 < self.heartbeat_interval < self.grace_period,
                f"heartbeat_interval={self.heartbeat_interval}, grace_period={self.grace_period}: need 0 < interval < grace period",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise PipelineError(message)

    @property
    def storage_url(self) -> str:
        """The storage parameter, else $KD_STORAGE_URL (which may carry a password), else optuna.db in the project."""
        return self.storage or os.environ.get(STORAGE_URL_ENV) or f"sqlite:///{PROJECT_ROOT / 'optuna.db'}"

    @property
    def imbalance_ratio(self) -> float:
        """The one imbalance ratio of a step run (0 = the data as it is); a list of them is for ``kd compare``."""
        ratios = parse_ratios(self.imbalance)
        if len(ratios) > 1:
            raise PipelineError(
                f"imbalance={self.imbalance!r}: a step trains on one ratio; give one (e.g. imbalance={ratios[-1]}), or compare the ratios "
                "with kd compare"
            )
        return float(ratios[0])

    @property
    def fold_count(self) -> int:
        """Validation fold entries: ``folds`` per repeat, ``repeats`` times (numbered k = repeat * folds + fold)."""
        return self.folds * self.repeats

    @property
    def teacher_size(self) -> int:
        """The teacher's input size: teacher_image_size, or the student's image_size when it is 0."""
        return self.teacher_image_size or self.image_size

    @property
    def teacher_seed(self) -> int:
        """The teacher's training seed: seed + teacher_seed_offset, kept in numpy's seed range."""
        return (self.seed + self.teacher_seed_offset) % 2**32

    @property
    def effective_alpha(self) -> float:
        """The no-KD baseline is plain hard-label training: alpha = 1."""
        return 1.0 if self.no_kd else self.alpha

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def as_params(self, names: Sequence[str]) -> dict[str, str]:
        """The named fields as MLflow params (strings, passwords in URLs hidden), the keys runs are matched on for reuse."""
        return {name: redact_url(str(getattr(self, name))) for name in names}


def redact_url(text: str) -> str:
    """A URL with its password replaced by ``***`` (``postgresql://user:***@host/db``, ``?password=***``); other text unchanged."""
    return re.sub(r"([?&]password=)[^&\s]+", r"\1***", re.sub(r"(://[^/:@\s]*:)[^@/\s]+@", r"\1***@", text), flags=re.IGNORECASE)


def reuse_fields(key: str) -> tuple[str, ...]:
    """The Config fields that belong to the reuse key ``key`` (one of REUSE_KEYS), in declaration order."""
    return tuple(f.name for f in fields(Config) if key in f.metadata["reuse"])


# Parameters that decide a step's result; a finished run whose params, data digest and code fingerprint match is reused.
# data_dir itself is not among them: the data digest identifies the data, wherever it is read from.
# imbalance and minority_class decide the folds' training rows: teacher and distill runs are reused per ratio.
DATA_PARAMS = reuse_fields("prepare")
# every field that decides what prepare_data returns (cache_dir only says where the decoded images are kept)
DATA_INPUTS = reuse_fields("data")
# kd_views is a teacher parameter: the teacher run caches its logits of that many views of every image.
TEACHER_PARAMS = reuse_fields("teacher")
# The teacher's settings too: a student distilled from another teacher is another student.
DISTILL_PARAMS = reuse_fields("distill")
# What a student without a teacher (no_kd, or alpha = 1) does not depend on.
TEACHER_ONLY_PARAMS = (
    "teacher_arch",
    "teacher_seed_offset",
    "teacher_weights",
    "teacher_image_size",
    "kd_views",
    "temperature",
    "teacher_mode",
)


def distill_params(cfg: Config) -> tuple[str, ...]:
    """The distill step's reuse key and logged parameters: without a teacher, the teacher's settings do not count, so
    one no-KD twin serves every teacher it is compared with."""
    if cfg.effective_alpha >= 1.0:
        return tuple(name for name in DISTILL_PARAMS if name not in TEACHER_ONLY_PARAMS)
    return DISTILL_PARAMS


SEARCH_PARAMS = reuse_fields("search")
# A comparison's reuse key and logged parameters: whatever decides its cells (imbalance, minority_class: in DATA_PARAMS).
COMPARE_PARAMS = reuse_fields("compare")
# The training-speed levers for real data that measured faster (benchmarks part 7 measures every lever alone against
# batch 16, one step per call, views one at a time, one fold at a time). fold_workers=2 is not among them: on 2 cores two
# one-thread fold processes measured slower than one two-thread process (benchmarks/training.py, LEVERS). The defaults
# stay those for tiny runs and the test suite, where a batch of 64 is more than a fold holds.
FAST_TRAINING = {"batch_size": 64, "steps_per_execution": 8, "parallel_augment": True}
# ``kd compare``'s own defaults: a small comparison that finishes on a fresh 2-core machine in minutes on the embedded
# synthetic set (12 cells, 4 teacher runs); a study of real data gives its folds and epochs (README).
COMPARE_DEFAULTS = {"folds": 3, "epochs": 8, "patience": 3, "image_size": 32, "synthetic_images": 200, "imbalance": "0,4"}


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


def build_parser(
    description: str, names: Sequence[str] | None = None, add_help: bool = True, own_defaults: dict[str, Any] | None = None
) -> argparse.ArgumentParser:
    """An argparse parser whose options are Config fields (``--data_dir`` and ``--data-dir`` both work); ``own_defaults``:
    a command's own defaults for some fields (``kd compare``'s), shown in their help."""
    parser = argparse.ArgumentParser(description=description, add_help=add_help)
    defaults = Config(**(own_defaults or {}))
    for f in fields(Config):
        if names is not None and f.name not in names:
            continue
        kind = {bool: _parse_bool, int: _parse_int, float: float}.get(type(getattr(defaults, f.name)), str)
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        limits = f" (range {LIMITS[f.name]})" if f.name in LIMITS else ""
        own = f" (default here {getattr(defaults, f.name)})" if f.name in (own_defaults or {}) else ""
        parser.add_argument(
            *flags, dest=f.name, type=kind, default=getattr(defaults, f.name), help=f"{f.metadata.get('help')}{limits}{own}"
        )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in known})
