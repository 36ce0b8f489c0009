"""The values Config fields may take: choices, numeric limits and the parsers of the fields written as text (teacher
specs, lists, ratios, class maps, student sizes), with the error every bad value gets. Imports nothing heavy."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
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
# How promote calibrates the probabilities a version serves (pipelines/evaluation/calibration.py): one temperature fitted on
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
# (pipelines.steps.prepare), and each step whose finished runs are reused. Every field names its keys in its metadata
# ("reuse", () for a field that decides no trained result): a new field cannot be left out of a key by forgetting a
# list, and a test fails on a field that names none.
REUSE_KEYS = ("data", "prepare", "teacher", "distill", "search", "compare")
ALL_KEYS = REUSE_KEYS  # what decides the prepared data decides every step after it
SOURCE_KEYS = ("data",)  # where the data comes from: run keys identify the data by its digest instead
TRAINING_KEYS = ("teacher", "distill", "search", "compare")  # how networks are trained


def redact_url(text: str) -> str:
    """A URL with its password replaced by ``***`` (``postgresql://user:***@host/db``, ``?password=***``); other text unchanged."""
    return re.sub(r"([?&]password=)[^&\s]+", r"\1***", re.sub(r"(://[^/:@\s]*:)[^@/\s]+@", r"\1***@", text), flags=re.IGNORECASE)
