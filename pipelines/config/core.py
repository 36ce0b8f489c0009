"""The one Config: its fields (``training_fields``, ``workflow_fields``) checked together, and the reuse keys and
parameter lists derived from their metadata."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipelines.config.training_fields import TrainingFields
from pipelines.config.values import (
    CALIBRATIONS,
    DEDUPE_MODES,
    KD_MODES,
    LIMITS,
    LR_SCALINGS,
    LR_SCHEDULES,
    PROJECT_ROOT,
    RANGE_LIMITS,
    SERVING_FORMATS,
    STORAGE_URL_ENV,
    STUDENT_NORMS,
    PipelineError,
    check_storage_parameter,
    modality_index,
    parse_class_map,
    parse_list,
    parse_range,
    parse_ratios,
    parse_student_size,
    parse_teacher,
    parse_teachers,
)
from pipelines.config.workflow_fields import WorkflowFields


@dataclass
class Config(WorkflowFields, TrainingFields):
    """Defaults for data, models, distillation and tracking. Field names are the CLI/MLproject names."""

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

    def check_comparison(self) -> None:
        """A comparison pits each KD student against its no-KD twin: with alpha = 1 (hard labels only) its KD cells would
        learn nothing from their teacher and be trained as no-KD twins."""
        if self.alpha >= 1.0:
            raise PipelineError(
                f"alpha={self.alpha:g}: a comparison's KD students would ignore their teacher (alpha weighs the hard-label loss); "
                "give alpha < 1 (the no-KD students are the comparison's own baseline)"
            )

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
# What a student without a teacher (no_kd, or alpha = 1) does not depend on; alpha too, which no_kd overrides: a no-KD
# twin keyed on it was trained again, to the same F1, for every alpha a comparison tried.
TEACHER_ONLY_PARAMS = (
    "alpha",
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
