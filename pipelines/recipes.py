"""Named training recipes: sets of existing :class:`~pipelines.config.Config` values, chosen together, that a command
takes with ``--recipe NAME``. A recipe only changes *defaults*: every value given explicitly on the command line wins,
so ``kd main --recipe strong --epochs 10`` is the strong recipe with 10 epochs, whatever the order of the flags.

The global defaults in :class:`Config` are not changed by a recipe; which values become defaults is decided by
measurement (``kd evidence`` on the real 4-class set, README "Evidence").

Light on purpose (no TensorFlow): ``kd`` reads it before parsing a command's options.
"""

from __future__ import annotations

from typing import Any

from pipelines.config import Config, PipelineError

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
        # larger batches keep 2 cores busy (the rate is scaled by sqrt(batch / 16)); more steps per call, fewer dispatches
        "batch_size": 64,
        "steps_per_execution": 4,
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
