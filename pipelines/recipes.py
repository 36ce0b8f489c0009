"""Named training recipes: sets of existing :class:`~pipelines.config.Config` values, chosen together, that a command
takes with ``--recipe NAME``. A recipe only changes *defaults*: every value given explicitly on the command line wins,
so ``kd main --recipe strong --epochs 10`` is the strong recipe with 10 epochs, whatever the order of the flags.

The global defaults in :class:`Config` are not changed by a recipe; which values become defaults is decided by
measurement (``kd evidence`` on the real 4-class set, README "Evidence").

Light on purpose (no TensorFlow): ``kd`` reads it before parsing a command's options.
"""

from __future__ import annotations

from typing import Any

from pipelines.config import FAST_TRAINING, Config, PipelineError, parse_list, parse_ratios, parse_teachers

# Each value is a Config field; why each is chosen is said beside it (the field's practice for from-scratch CNNs on small
# medical sets). "strong" is the candidate teacher recipe of issue 23, to be confirmed or changed by its measured run.
RECIPES: dict[str, dict[str, Any]] = {
    "strong": {
        # the teacher: our residual CNN at size M, at 1.5x the student's default 64 px (its logits are cached per image,
        # so the student's cost is unchanged)
        "teacher_arch": "resnet:M",
        "teacher_image_size": 96,
        # augmentation on: a 690 k-parameter network from scratch overfits a few thousand scans without it
        "augment": True,
        # AdamW with a linear warm-up and cosine decay: the usual schedule for from-scratch CNNs
        "weight_decay": 0.05,
        "warmup_epochs": 3.0,
        "lr_schedule": "cosine",
        # the training-speed levers for real data that measured faster (FAST_TRAINING, benchmarks part 7): batch 64 (the rate
        # scaled by sqrt(batch / 16)), 8 steps per call, views made on every core
        **FAST_TRAINING,
        # enough epochs for the cosine schedule to matter, early stopping as the guard
        "epochs": 40,
        "patience": 10,
    },
}


def recipe_values(name: str) -> dict[str, Any]:
    """The Config values of recipe ``name`` (empty: none), refused with the names there are."""
    if not name:
        return {}
    if name not in RECIPES:
        raise PipelineError(f"recipe={name!r}: not a recipe; use one of {', '.join(RECIPES)} (pipelines/recipes.py), or none")
    return dict(RECIPES[name])


def recipe_config(name: str, **explicit: Any) -> Config:
    """A Config of recipe ``name`` in Python: its values, then the ``explicit`` ones over them (as on the command line)."""
    return Config(**{**recipe_values(name), **explicit})


def recipe_flags(name: str, style: str = "kd") -> str:
    """The recipe as command-line flags: ``--augment true ...`` for ``kd`` (``style="kd"``), ``-P augment=true ...`` for
    ``mlflow run`` (``style="mlflow"``), whose entry points pass every parameter and so cannot take a recipe's defaults."""
    values = recipe_values(name)
    text = {
        key: str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)
        for key, value in values.items()
    }
    if style == "mlflow":
        return " ".join(f"-P {key}={value}" for key, value in text.items())
    return " ".join(f"--{key} {value}" for key, value in text.items())


# ``kd evidence``'s own defaults (its other options are the Config's, and the recipe's): the real 4-class set as its
# README names it from the project root, 3 folds x 3 repeats (9 paired fold entries, issue 23), students of two sizes,
# the data as it is and with the minority subsampled to 1:10, and names of its own for the study, experiment, comparison
# and registered model, so the evidence never mixes with another data set's runs.
EVIDENCE_DEFAULTS: dict[str, Any] = {
    "data_dir": "../shared/data/brain-mri-4class",
    "folds": 3,
    "repeats": 3,
    "imbalance": "0,10",
    "students": "tiny,small",
    "n_trials": 8,
    "comparison_name": "evidence-brain-4class",
    "study_name": "evidence-brain-4class",
    "experiment_name": "evidence-brain-4class",
    "model_name": "brain-4class-student",
}
EVIDENCE_RECIPE = "strong"


def check_evidence(cfg: Config) -> None:
    """Refuse, before anything heavy loads, an evidence that could not answer its questions."""
    if len(parse_teachers(cfg.teacher_arch)) > 1:
        raise PipelineError(
            f"teacher_arch={cfg.teacher_arch!r}: the evidence compares one teacher with its students; give one (e.g. resnet:M)"
        )
    if len(parse_list("students", cfg.students)) < 2:
        raise PipelineError(f"students={cfg.students!r}: the evidence compares students of at least two sizes (e.g. tiny,small)")
    if not any(float(ratio) == 0 for ratio in parse_ratios(cfg.imbalance)):
        raise PipelineError(f"imbalance={cfg.imbalance!r}: include 0, the data as it is (e.g. 0,10): the teacher's figures are of it")
