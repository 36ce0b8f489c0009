"""Arguments are checked first: every numeric parameter has a range, a storage URL never carries a password,
and every CLI refuses a bad argument with one line before TensorFlow, MLflow, Optuna or the data are imported
(the time that takes is measured in benchmarks/arguments.py; here, what gets imported)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from kdtest import child_env

from kd.cli import EVIDENCE_LEFT_OUT
from pipelines.config import LIMITS, RANGE_LIMITS, STORAGE_URL_ENV, Config, PipelineError, build_parser

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "mlflow", "optuna", "pandas", "sklearn", "sqlalchemy")
# The `kd` commands that take the data and training options (as users and MLproject run them: `python -m kd <command>`).
CLIS = ("prepare", "teacher", "distill", "main", "search", "promote", "export", "compare", "evidence")
PREPARE_OPTIONS = {"image_size", "test_fraction", "folds", "seed", "synthetic_images"}


def test_every_numeric_parameter_has_a_range_shown_in_its_help() -> None:
    numeric = {name for name, value in vars(Config()).items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    assert numeric == set(LIMITS), f"parameters without a range: {numeric - set(LIMITS)}; ranges of no parameter: {set(LIMITS) - numeric}"
    helps = {action.dest: action.help for action in build_parser("x")._actions}
    for name, limits in LIMITS.items():
        assert f"(range {limits})" in helps[name], helps[name]
        assert getattr(Config(), name) in limits, f"the default of {name} is outside its own range"


@pytest.mark.parametrize("name", sorted(RANGE_LIMITS))
def test_search_ranges_beyond_the_parameters_limits_are_refused(name: str) -> None:
    limits = RANGE_LIMITS[name][0]
    with pytest.raises(PipelineError, match=f"^{name}="):
        Config(**{name: f"{limits.low if not limits.low_open else 1},{limits.high * 10 + 1}"})


def test_fold_ranges_over_every_entry_of_the_repeated_k_fold() -> None:
    assert Config(folds=3, repeats=2).fold_count == 6
    assert Config(folds=3, repeats=2, fold=5).fold == 5
    with pytest.raises(PipelineError, match=r"^fold=6: use -1 \(all\) or 0\.\.5 \(folds x repeats = 3 x 2\)"):
        Config(folds=3, repeats=2, fold=6)
    with pytest.raises(PipelineError, match="^repeats=11: out of range"):
        Config(repeats=11)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://kd:PgSecretPw99@db.example/optuna",
        "postgresql+psycopg://:PgSecretPw99@127.0.0.1/optuna",
        "postgresql://kd@db.example/optuna?sslmode=require&password=PgSecretPw99",
        "mysql://kd:PgSecretPw99@db/optuna",
    ],
)
def test_a_storage_url_with_a_password_is_refused_without_repeating_it(url: str) -> None:
    with pytest.raises(PipelineError) as error:
        Config(storage=url)
    message = str(error.value)
    assert "PgSecretPw99" not in message and "PGPASSWORD" in message and STORAGE_URL_ENV in message


def test_the_storage_url_comes_from_the_environment_when_the_parameter_is_empty(monkeypatch) -> None:
    monkeypatch.setenv(STORAGE_URL_ENV, "postgresql://kd:PgSecretPw99@db.example/optuna")
    assert Config().storage_url == "postgresql://kd:PgSecretPw99@db.example/optuna"
    assert Config(storage="sqlite:///given.db").storage_url == "sqlite:///given.db", "an explicit parameter wins"
    assert "PgSecretPw99" not in json.dumps(Config().as_params(["storage", "study_name"]))


def _refuse(cli: str, *options: str) -> tuple[str, list[str]]:
    """Run a CLI with bad options; returns its error line and the heavy modules it had imported when it exited."""
    probe = (
        "import atexit, runpy, sys; "
        f"atexit.register(lambda: print('IMPORTED', *(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)); "
        f"sys.argv = ['x', *{[cli, *options]!r}]; runpy.run_module('kd', run_name='__main__', alter_sys=True)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=child_env(**{STORAGE_URL_ENV: ""}), capture_output=True, text=True, timeout=120
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("IMPORTED"), (
        cli,
        options,
        result.stderr[-2000:],
    )
    return lines[0], lines[1].split()[1:]


BAD = [
    ("image_size", "100000"),
    ("image_size", "-1"),
    ("folds", "1000"),
    ("seed", "-5"),
    ("learning_rate", "5"),
    ("temperature", "1e20"),
    ("n_trials", "0"),
    ("student_size", "4096x9"),
    ("width_range", "8,100000"),
    ("modality", "dwi"),
    ("student_norm", "layer"),
    ("serving_format", "onnx"),
    ("calibration", "platt"),
    ("storage", "postgresql://kd:PgSecretPw99@db/optuna"),
]


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_every_cli_refuses_bad_arguments_before_importing_tensorflow_or_the_stores(cli: str, reliability) -> None:
    known = {action.dest for action in build_parser("x")._actions}
    tried = 0
    for name, value in BAD:
        if name not in known or (cli == "prepare" and name not in PREPARE_OPTIONS | {"modality"}):
            continue
        if cli == "evidence" and name in EVIDENCE_LEFT_OUT:  # it takes students, not one student_size
            continue
        message, imported = _refuse(cli, f"--{name}", value)
        assert message.startswith(f"error: {name}=") and "PgSecretPw99" not in message, message
        assert not imported, f"{cli} imported {imported} before refusing {name}={value}"
        tried += 1
    assert tried >= 5
    reliability.bad_input(
        f"`kd {cli}` with an out-of-range size, seed, rate, range, student size, modality or a password in storage",
        f"{tried} bad arguments: exit 2 with one line naming the parameter,"
        " before TensorFlow, MLflow, Optuna, pandas or a store is imported",
    )


@pytest.mark.parametrize("cli", ["compare", "evidence"])
def test_a_comparison_whose_kd_students_would_ignore_their_teacher_is_refused_before_importing_tensorflow(cli: str) -> None:
    # alpha = 1 trained every KD cell as a no-KD twin, and the comparison then stopped on a KeyError with no message
    message, imported = _refuse(cli, "--alpha", "1")
    assert message.startswith("error: alpha=1:") and "alpha < 1" in message, message
    assert not imported, imported


def test_kd_lists_every_command_and_each_command_shows_its_config_options(capsys) -> None:
    from kd.cli import COMMANDS, main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    listing = capsys.readouterr().out
    assert done.value.code == 0 and all(f"\n    {name} " in listing for name in COMMANDS), listing
    for name, command in COMMANDS.items():
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        shown = capsys.readouterr().out
        assert done.value.code == 0 and shown.startswith(f"usage: kd {name} "), (name, shown[:200])
        options = [f.name for f in fields(Config)] if command.fields is None else command.fields
        assert all(f"--{option}" in shown for option in options), (name, shown)


@pytest.mark.parametrize("argv", [[], ["teach"], ["--image_size", "64"]])
def test_kd_without_a_known_command_exits_2_naming_the_commands(argv: list[str], capsys) -> None:
    from kd.cli import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2 and "usage: kd" in capsys.readouterr().err


def test_the_report_takes_a_comparison_by_name_or_id_and_refuses_quotes() -> None:
    from mlflow.projects._project_spec import load_project

    from kd.cli import COMMANDS

    assert Config(comparison="sizes-2026").comparison == "sizes-2026" and Config().comparison == ""
    for bad in ("a'b", 'a"b', "a`b", "a\\b"):
        with pytest.raises(PipelineError, match="^comparison="):
            Config(comparison=bad)
    assert COMMANDS["report"].parser("report").parse_args(["--comparison", "sizes"]).comparison == "sizes"
    entry = load_project(str(ROOT)).get_entry_point("report")
    assert entry.parameters["comparison"].default == Config().comparison and "--comparison {comparison}" in entry.command
