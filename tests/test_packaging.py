"""Code tests for packaging: the environments agree and the MLproject keeps its contract."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = {
    "prepare": {"data_dir", "image_size", "folds", "repeats", "seed"},
    "teacher": {"data_dir", "image_size", "folds", "repeats", "epochs", "seed"},
    "distill": {"data_dir", "image_size", "folds", "repeats", "epochs", "seed", "temperature", "alpha", "student_size", "teacher_mode"},
    "search": {"data_dir", "n_trials", "study_name", "storage", "folds", "repeats", "epochs", "seed", "max_params", "max_latency_ms"},
    "promote": {"study_name", "storage", "model_name", "margin", "force", "serving_format", "calibration", "boxes_dir"},
    "main": {
        "data_dir",
        "image_size",
        "folds",
        "repeats",
        "epochs",
        "seed",
        "n_trials",
        "study_name",
        "model_name",
        "max_params",
        "serving_format",
        "calibration",
        "boxes_dir",
    },
    "compare": {
        "data_dir",
        "image_size",
        "folds",
        "repeats",
        "epochs",
        "seed",
        "teachers",
        "students",
        "imbalance",
        "minority_class",
        "temperature",
        "alpha",
        "comparison_name",
    },
}


def test_conda_env_pins_exactly_the_pyproject_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(item["pip"] for item in conda["dependencies"] if isinstance(item, dict))
    assert sorted(pip_section) == sorted(project["dependencies"])
    assert all("==" in requirement for requirement in project["dependencies"]), "every dependency is pinned"
    python = next(item for item in conda["dependencies"] if isinstance(item, str) and item.startswith("python="))
    assert python.split("=")[1] in ("3.11", "3.12")


def test_the_gpu_extra_is_the_cuda_build_of_the_very_tensorflow_the_project_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cpu = next(r for r in project["dependencies"] if r.startswith("tensorflow-cpu=="))
    assert project["optional-dependencies"]["gpu"] == [f"tensorflow[and-cuda]=={cpu.split('==')[1]}"]
    assert "gpu extra" in (ROOT / "conda.yaml").read_text(), "conda.yaml says how to add it"


def test_mlproject_entry_points_keep_their_contract():
    from mlflow.projects._project_spec import load_project

    project = load_project(str(ROOT))
    for entry, required in CONTRACT.items():
        parameters = set(project.get_entry_point(entry).parameters)
        assert required <= parameters, f"{entry} lacks {required - parameters}"
        assert entry != "compare" or parameters == required, "compare takes exactly the parameters of its contract"
        # every parameter reaches the command line of the step
        command = project.get_entry_point(entry).command
        assert all(f"{{{name}}}" in command for name in parameters)
    assert project.get_entry_point("distill").parameters["teacher_mode"].default == "cached"
    # evaluate: a registered version (by stage, alias or version) on data from elsewhere; data_dir is required
    evaluate = project.get_entry_point("evaluate")
    assert {"model_name", "stage", "alias", "version", "data_dir", "class_map", "dedupe"} <= set(evaluate.parameters)
    assert all(f"{{{name}}}" in evaluate.command for name in evaluate.parameters)
    assert evaluate.parameters["data_dir"].default is None


def test_every_mlproject_parameter_is_a_config_field_with_the_same_default():
    from mlflow.projects._project_spec import load_project

    from pipelines.config import COMPARE_DEFAULTS, Config

    for entry in CONTRACT:
        defaults = Config(**COMPARE_DEFAULTS) if entry == "compare" else Config()  # kd compare's own defaults
        for name, parameter in load_project(str(ROOT)).get_entry_point(entry).parameters.items():
            value = getattr(defaults, name)
            if isinstance(value, bool):
                assert str(parameter.default).lower() == str(value).lower(), name
            elif isinstance(value, (int, float)):
                assert float(parameter.default) == float(value), name
            else:
                assert parameter.default == value, name


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert "\nrun:" in makefile and "\ntest:" in makefile


def test_the_kd_console_script_is_the_kd_command_line():
    from kd.cli import main

    module, function = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["kd"].split(":")
    assert getattr(importlib.import_module(module), function) is main
    assert "kd*" in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]


def test_every_mlproject_entry_point_runs_the_kd_command_of_its_name():
    from mlflow.projects._project_spec import load_project

    from kd.cli import COMMANDS

    project = load_project(str(ROOT))
    for entry in project._entry_points:
        command = project.get_entry_point(entry).command.split()
        # `python -m kd`, not the `kd` script: conda.yaml's environment (mlflow run without --env-manager) lacks the project
        assert command[:4] == ["python", "-m", "kd", entry] and entry in COMMANDS, command[:4]
