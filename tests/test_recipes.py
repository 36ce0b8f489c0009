"""Named recipes (``--recipe``): a recipe's values are defaults, every explicitly given option wins wherever it stands,
an unknown recipe is refused in one line, and the evidence page shows the recipe that the code holds."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from kdtest import child_env

from kd.cli import COMMANDS
from pipelines.config import FAST_TRAINING, Config, PipelineError, config_from_args
from pipelines.recipes import RECIPES, recipe_config, recipe_flags, recipe_values

ROOT = Path(__file__).resolve().parents[1]


def parsed(command: str, argv: list[str]) -> Config:
    spec = COMMANDS[command]
    return config_from_args(spec.parser(command, spec.chosen_recipe(argv)).parse_args(argv))


def test_every_recipe_value_is_a_valid_config_field():
    names = {f.name for f in fields(Config)}
    for name, values in RECIPES.items():
        assert set(values) <= names, f"recipe {name}: {set(values) - names} are not Config fields"
        cfg = recipe_config(name)  # validated like any Config
        assert all(getattr(cfg, key) == value for key, value in values.items())
    assert FAST_TRAINING.items() <= RECIPES["strong"].items(), "the strong recipe trains with the speed levers for real data"


def test_a_recipe_sets_defaults_and_explicit_options_win_before_or_after_it():
    strong = RECIPES["strong"]
    cfg = parsed("main", ["--recipe", "strong"])
    assert all(getattr(cfg, key) == value for key, value in strong.items())
    for argv in (["--epochs", "7", "--recipe", "strong"], ["--recipe", "strong", "--epochs", "7"]):
        cfg = parsed("main", argv)
        assert cfg.epochs == 7 and cfg.augment is True and cfg.lr_schedule == strong["lr_schedule"], argv
    explicit_default = parsed("teacher", ["--recipe", "strong", "--augment", "false", "--lr_schedule", "constant"])
    assert explicit_default.augment is False and explicit_default.lr_schedule == "constant", "an explicit default value still wins"
    plain = parsed("main", [])
    assert plain == Config(), "without --recipe the global defaults are unchanged"


def test_recipe_config_in_python_takes_explicit_values_over_the_recipe():
    cfg = recipe_config("strong", epochs=3, augment=False)
    assert cfg.epochs == 3 and cfg.augment is False and cfg.weight_decay == RECIPES["strong"]["weight_decay"]
    with pytest.raises(PipelineError, match=r"^recipe='fast': not a recipe; use one of strong"):
        recipe_values("fast")


def test_an_unknown_recipe_is_refused_in_one_line_before_anything_loads():
    refused = subprocess.run(
        [sys.executable, "-m", "kd", "teacher", "--recipe", "fast"], env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "error: recipe='fast': not a recipe; use one of strong (pipelines/recipes.py), or none"
    )


def test_the_evidence_page_shows_the_recipe_the_code_holds():
    readme = (ROOT / "docs" / "evidence.md").read_text()
    for name in RECIPES:
        assert recipe_flags(name, "mlflow") in readme, (
            f"docs/evidence.md's mlflow run line of recipe {name} differs from pipelines/recipes.py"
        )
        assert f"--recipe {name}" in readme
