"""One compiled trainer per thread, kept for the next fit of a model with the same structure: Keras traces a new model's
train and test steps on its first epoch, and every fold, trial and cell builds a new model that differs from the last
only in its weights. :func:`pipelines.training.fit.fit` trains through :func:`compiled_like`."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING

import keras
import numpy as np

if TYPE_CHECKING:
    from pipelines.models.distiller import Distiller


def _structure(config):
    """A Keras config without its ``seed`` entries: two models that differ only in their initial weights (and the seeds of
    their random layers, whose states are variables) have one structure, and trace to the same steps."""
    if isinstance(config, dict):
        return {key: _structure(value) for key, value in config.items() if key != "seed"}
    if isinstance(config, list):
        return [_structure(value) for value in config]
    return config


def _signature(trainer: Distiller, optimiser: keras.optimizers.Optimizer, steps_per_execution: int) -> str:
    """What the traced train and test steps of ``trainer`` compiled with ``optimiser`` depend on, besides variable values."""
    models = [trainer.student.get_config(), None if trainer.teacher is None else trainer.teacher.get_config()]
    parts = [type(trainer).__name__, _structure(models), trainer.temperature, trainer.alpha, trainer.binary]
    settings = {key: value for key, value in optimiser.get_config().items() if key != "name"}  # adam, adam_1, ...: one per instance
    return json.dumps([*parts, type(optimiser).__name__, settings, steps_per_execution], sort_keys=True, default=str)


class _Compiled(threading.local):
    """The last trainer :func:`compiled_like` compiled in this thread, with the signature it was compiled for and its optimiser's
    initial state."""

    signature: str = ""
    trainer: Distiller | None = None
    initial_optimiser: list[np.ndarray] = []


_compiled = _Compiled()


def forget_compiled_steps() -> None:
    """Drop the compiled trainer :func:`compiled_like` keeps (this thread's): the next fit traces its steps, as in a new process.
    Benchmarks call it so that each variant pays its own tracing."""
    _compiled.signature, _compiled.trainer, _compiled.initial_optimiser = "", None, []


def compiled_like(trainer: Distiller, optimiser: keras.optimizers.Optimizer, steps_per_execution: int) -> Distiller:
    """A compiled trainer, never ``trainer`` itself, holding ``trainer``'s variables and a fresh ``optimiser``'s state: the
    one compiled last when it has the same structure, else a new copy of ``trainer``, compiled and kept for the next fit.

    Keras traces a new model's train and test steps on its first epoch: 10-15 s for the resnet teacher on 2 cores, most of
    a short fold's training, and every fold, trial and cell builds a new model that differs from the last one only in its
    weights. Reusing the compiled one trains the same function from the same state (tested against a fresh compile); it
    is a copy, so the models handed back (each fold's) never share variables."""
    signature = _signature(trainer, optimiser, steps_per_execution)
    if _compiled.trainer is None or signature != _compiled.signature:
        clone = keras.models.clone_model
        copy = type(trainer)(
            clone(trainer.student),
            None if trainer.teacher is None else clone(trainer.teacher),
            trainer.temperature,
            trainer.alpha,
            trainer.binary,
        )
        copy.compile(optimizer=optimiser, steps_per_execution=steps_per_execution)
        optimiser.build(copy.trainable_variables)
        _compiled.signature, _compiled.trainer = signature, copy
        _compiled.initial_optimiser = [variable.numpy() for variable in optimiser.variables]
    reused = _compiled.trainer
    copy_variables(trainer, reused)
    for variable, value in zip(reused.optimizer.variables, _compiled.initial_optimiser):
        variable.assign(value)
    return reused


def copy_variables(source: keras.Model, target: keras.Model) -> None:
    """Every variable of ``source`` (weights, BatchNorm statistics, random layers' seed states) into ``target``'s."""
    pairs = list(zip(source.variables, target.variables, strict=True))
    for left, right in pairs:
        if left.shape != right.shape:
            raise ValueError(f"variable {left.path} {left.shape} cannot go into {right.path} {right.shape}")
    for left, right in pairs:
        right.assign(left)
