"""The search space: temperature, alpha, student size and learning rate, with ranges from the Config, and the
teacher when the Config lists several; and the two trials every new study starts with (``SearchSpace.anchors``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import optuna

from pipelines.config import Config, PipelineError, parse_range, parse_student_size, teacher_choices
from pipelines.log import logger

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
    teachers: tuple[str, ...]  # candidates; a categorical teacher_arch parameter only when there are several

    @classmethod
    def from_config(cls, cfg: Config) -> SearchSpace:
        """Parse and check every range before any training starts."""
        space = cls(
            temperature=_range(cfg, "temperature_range", positive=True),
            alpha=_range(cfg, "alpha_range"),
            width=_range(cfg, "width_range", int, positive=True),
            depth=_range(cfg, "depth_range", int, positive=True),
            learning_rate=_range(cfg, "learning_rate_range", positive=True),
            teachers=teacher_choices(cfg),
        )
        if not (0.0 <= space.alpha[0] and space.alpha[1] <= 1.0):
            raise PipelineError(f"alpha_range={cfg.alpha_range!r}: alpha lies in [0, 1]")
        return space

    @property
    def widest(self) -> int:
        """The largest width the search proposes: widths go in steps of 4 from the range's low end."""
        return self.width[0] + (self.width[1] - self.width[0]) // WIDTH_STEP * WIDTH_STEP

    def suggest(self, trial: optuna.Trial, cfg: Config) -> tuple[dict[str, float | int | str], Config]:
        """The trial's parameters, and the Config that trains the student with them."""
        params: dict[str, float | int | str] = {
            "temperature": trial.suggest_float("temperature", *self.temperature, log=True),
            "alpha": trial.suggest_float("alpha", *self.alpha),
            # Widths in steps of 4: finer steps change the student too little to be worth a trial.
            "width": trial.suggest_int("width", self.width[0], self.widest, step=WIDTH_STEP),
            "depth": trial.suggest_int("depth", *self.depth),
            "learning_rate": trial.suggest_float("learning_rate", *self.learning_rate, log=True),
        }
        if len(self.teachers) > 1:
            params["teacher_arch"] = trial.suggest_categorical("teacher_arch", list(self.teachers))
        return params, trial_config(cfg, params)

    def anchors(self, cfg: Config) -> list[dict[str, float | int | str]]:
        """The parameters of a new study's first two trials, so the search never ends below them: the no-KD baseline
        (alpha = 1) and the Config's distillation setting, by default the published one (T = 5, alpha = 0.5); both with
        the Config's student size, learning rate and (of several) first teacher.

        A value outside this space's ranges is moved to the nearest value the search could propose, and a line says so.
        A student over the study's budget (``max_params``, ``max_latency_ms``) is skipped before training like any other
        trial's (``search.objective``), so an anchor never breaks the budget and, skipped, takes no place among the n_trials.
        """
        width, depth = parse_student_size(cfg.student_size)
        common = {
            "temperature": cfg.temperature,
            "width": width,
            "depth": depth,
            "learning_rate": cfg.learning_rate,
            **({"teacher_arch": self.teachers[0]} if len(self.teachers) > 1 else {}),
        }
        trials = {"no-KD baseline": {**common, "alpha": 1.0}, "published setting": {**common, "alpha": cfg.alpha}}
        return [self._inside(name, params) for name, params in trials.items()]

    def _inside(self, name: str, params: dict[str, float | int | str]) -> dict[str, float | int | str]:
        """``params`` moved into the ranges (widths onto the grid of steps of 4), printing one line per moved value."""
        ranges = {
            "temperature": self.temperature,
            "alpha": self.alpha,
            "width": (self.width[0], self.widest),
            "depth": self.depth,
            "learning_rate": self.learning_rate,
        }
        inside = dict(params)
        for key, (low, high) in ranges.items():
            value = min(max(params[key], low), high)
            if key == "width":
                value = low + round((value - low) / WIDTH_STEP) * WIDTH_STEP
            if value != params[key]:
                grid = f" in steps of {WIDTH_STEP}" if key == "width" else ""
                logger("search").info(
                    f"the {name} trial's {key} {params[key]} is not in the search's range {low}..{high}{grid}; it starts at {value}"
                )
                inside[key] = value
        return inside


def trial_config(cfg: Config, params: Mapping[str, float | int | str]) -> Config:
    """The Config that trains the student of a trial's parameters (suggested now, or read back from the study).

    A study among several teachers has the trial's choice in ``teacher_arch``; a single-teacher study keeps its teacher.
    """
    return cfg.replace(
        temperature=params["temperature"],
        alpha=params["alpha"],
        student_size=f"{params['width']}x{params['depth']}",
        learning_rate=params["learning_rate"],
        teacher_arch=params.get("teacher_arch", cfg.teacher_arch),
    )


def teacher_config(cfg: Config, params: Mapping[str, float | int | str]) -> Config:
    """The Config a trial's teacher is found or trained with: the study's settings (its learning rate, not the trial's:
    the teacher's reuse key includes it, and every trial must share the study's teachers) and the trial's teacher."""
    return cfg.replace(teacher_arch=params.get("teacher_arch", cfg.teacher_arch))
