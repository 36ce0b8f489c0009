"""The search space: temperature, alpha, student size and learning rate, with ranges from the Config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import optuna

from pipelines.config import Config, PipelineError, parse_range

WIDTH_STEP = 4


def _range(cfg: Config, name: str, cast=float, positive: bool = False) -> tuple:
    return parse_range(name, getattr(cfg, name), cast, positive)


@dataclass(frozen=True)
class SearchSpace:
    temperature: tuple[float, float]
    alpha: tuple[float, float]
    width: tuple[int, int]
    depth: tuple[int, int]
    learning_rate: tuple[float, float]

    @classmethod
    def from_config(cls, cfg: Config) -> SearchSpace:
        """Parse and check every range before any training starts."""
        space = cls(
            temperature=_range(cfg, "temperature_range", positive=True),
            alpha=_range(cfg, "alpha_range"),
            width=_range(cfg, "width_range", int, positive=True),
            depth=_range(cfg, "depth_range", int, positive=True),
            learning_rate=_range(cfg, "learning_rate_range", positive=True),
        )
        if not (0.0 <= space.alpha[0] and space.alpha[1] <= 1.0):
            raise PipelineError(f"alpha_range={cfg.alpha_range!r}: alpha lies in [0, 1]")
        return space

    def suggest(self, trial: optuna.Trial, cfg: Config) -> tuple[dict[str, float | int], Config]:
        """The trial's parameters, and the Config that trains the student with them."""
        params = {
            "temperature": trial.suggest_float("temperature", *self.temperature, log=True),
            "alpha": trial.suggest_float("alpha", *self.alpha),
            # Widths in steps of 4: finer steps change the student too little to be worth a trial.
            "width": trial.suggest_int(
                "width", self.width[0], self.width[0] + (self.width[1] - self.width[0]) // WIDTH_STEP * WIDTH_STEP, step=WIDTH_STEP
            ),
            "depth": trial.suggest_int("depth", *self.depth),
            "learning_rate": trial.suggest_float("learning_rate", *self.learning_rate, log=True),
        }
        return params, trial_config(cfg, params)


def trial_config(cfg: Config, params: Mapping[str, float | int]) -> Config:
    """The Config that trains the student of a trial's parameters (suggested now, or read back from the study)."""
    return cfg.replace(
        temperature=params["temperature"],
        alpha=params["alpha"],
        student_size=f"{params['width']}x{params['depth']}",
        learning_rate=params["learning_rate"],
    )
