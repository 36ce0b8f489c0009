"""``kd <command> [options]`` (or ``python -m kd <command>``): every step and registry tool from the shell.

Each command calls the same function as its MLproject entry point. Its options are the :class:`Config` fields it
takes (``--help`` is generated from them), plus a few of its own. The arguments are parsed and the whole Config
checked before the command's module is imported, so a bad argument is refused in a fraction of a second instead
of after TensorFlow, MLflow and the data have loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from kd.registry_commands import (
    card_command,
    card_options,
    evaluate_command,
    evaluate_options,
    explain_command,
    explain_options,
    export_command,
    fetch_command,
    history_command,
    promote_command,
    report_command,
    report_options,
    rollback_command,
    serve_command,
    serve_options,
    server_command,
    server_options,
    version_options,
)
from pipelines.config import (
    COMPARE_DEFAULTS,
    DATA_INPUTS,
    Config,
    PipelineError,
    build_parser,
    config_from_args,
)
from pipelines.log import set_verbosity
from pipelines.recipes import EVIDENCE_DEFAULTS, EVIDENCE_RECIPE, RECIPES, check_evidence, recipe_values
from pipelines.steps.cli import fail, run_cli

# Config fields kd evidence does not take: the teacher is teacher_arch, the students are students, every fold entry runs.
EVIDENCE_LEFT_OUT = ("teachers", "student_size", "no_kd", "fold", "comparison")


@dataclass(frozen=True)
class Command:
    """One ``kd`` command: what it does, its options and the function it runs on the checked arguments."""

    description: str
    run: Callable[[Config, argparse.Namespace], Any]  # imports its module only when called
    fields: Sequence[str] | None = None  # the Config fields it takes as options; None = all of them
    options: Callable[[argparse.ArgumentParser], None] | None = None  # options beyond the Config fields
    add_help: bool = True  # False: the options take -h themselves
    defaults: dict[str, Any] | None = None  # its own defaults of some Config fields
    ratios: bool = False  # takes a list of imbalance ratios (compare); every other command trains on one
    recipe: str | None = None  # takes --recipe (pipelines/recipes.py), this one by default ("" none); None: no --recipe

    def parser(self, name: str, recipe: str = "") -> argparse.ArgumentParser:
        """The command's options; ``recipe``: a recipe whose values are the defaults (explicit options win)."""
        parser = build_parser(self.description, self.fields, self.add_help, {**(self.defaults or {}), **recipe_values(recipe)})
        parser.prog = f"kd {name}"
        if self.recipe is not None:
            parser.add_argument(
                "--recipe",
                default=self.recipe,
                help=f"a named set of defaults ({', '.join(RECIPES)}; empty = none); options given explicitly win "
                f"(default here {self.recipe!r})",
            )
        if self.options:
            self.options(parser)
        talk = parser.add_mutually_exclusive_group()
        talk.add_argument("--quiet", dest="verbosity", action="store_const", const="quiet", help="warnings and errors only")
        talk.add_argument("--verbose", dest="verbosity", action="store_const", const="verbose", help="debug messages too")
        parser.set_defaults(verbosity="normal")
        return parser

    def chosen_recipe(self, argv: list[str]) -> str:
        """The ``--recipe`` in ``argv`` (or the command's default), read before the command's own parser is built."""
        if self.recipe is None:
            return ""
        early = argparse.ArgumentParser(add_help=False)
        early.add_argument("--recipe", default=self.recipe)
        return early.parse_known_args(argv)[0].recipe


def _prepare(cfg: Config, args: argparse.Namespace) -> str:
    from pipelines.steps.prepare import prepare

    return prepare(cfg, launched_run_id=args.launched_run_id)


def _teacher(cfg: Config, args: argparse.Namespace) -> str:
    from pipelines.steps.teacher import train_teacher

    return train_teacher(cfg, launched_run_id=args.launched_run_id)


def _distill(cfg: Config, args: argparse.Namespace) -> str:
    from pipelines.steps.distill import distill

    return distill(cfg, launched_run_id=args.launched_run_id)


def _search(cfg: Config, args: argparse.Namespace) -> Any:
    from search.tune import run_search

    return run_search(cfg, launched_run_id=args.launched_run_id)


def _compare(cfg: Config, args: argparse.Namespace) -> str:
    from registry.report.comparison import write_tables_when_complete
    from search.compare import run_comparison

    comparison_id = run_comparison(cfg, launched_run_id=args.launched_run_id)
    write_tables_when_complete(comparison_id, cfg)
    return comparison_id


def _evidence_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out-dir", "--out_dir", dest="out_dir", default="", help="folder of the documents; empty = docs/<comparison_name> in the project"
    )
    for name, what in (("folds", "folds"), ("repeats", "repeats")):
        parser.add_argument(
            f"--main-{name}",
            f"--main_{name}",
            dest=f"main_{name}",
            type=int,
            default=0,
            help=f"the main run's {what}; 0 = the comparison's (a main run with the comparison's folds and repeats shares its teacher)",
        )


def _evidence(cfg: Config, args: argparse.Namespace) -> Any:
    check_evidence(cfg)  # before the heavy imports
    from kd.evidence import run_evidence

    return run_evidence(cfg, args.out_dir, args.main_folds, args.main_repeats, args.recipe, args.command_line, args.launched_run_id)


def _main(cfg: Config, args: argparse.Namespace) -> dict[str, str]:
    from kd.main import run_main

    return run_main(cfg, launched_run_id=args.launched_run_id)


COMMANDS = {
    "prepare": Command(
        "Ingest, decode and split the data; log the manifest and splits to MLflow.",
        _prepare,
        DATA_INPUTS + ("experiment_name", "cache_dir"),
    ),
    "teacher": Command("Train one teacher per fold and one on all training data (reused when already trained).", _teacher, recipe=""),
    "distill": Command("Distil a student from the teachers (trained first when missing), cross-validated.", _distill, recipe=""),
    "search": Command(
        "Optuna search of temperature, alpha, student size and learning rate by k-fold F1. Start more workers with the same "
        "--storage and --study-name to share the study.",
        _search,
        recipe="",
    ),
    "compare": Command(
        "Compare teachers x students x KD/no-KD x imbalance ratios on the same folds, one nested run per cell; resumes where "
        "it stopped, and workers started with the same --storage share the cells. Its defaults: a small comparison of the "
        "embedded synthetic set.",
        _compare,
        defaults=COMPARE_DEFAULTS,
        ratios=True,
        recipe="",
    ),
    "main": Command("Run prepare -> teacher -> search -> promote, reusing finished steps.", _main, recipe=""),
    "evidence": Command(
        "Run (or reuse) the main chain and the comparison of the teacher with each student, KD and no-KD, at each imbalance ratio, "
        "then write results.json, Markdown and LaTeX tables and figures from the tracking store. Its defaults: the real 4-class "
        "set with the strong recipe.",
        _evidence,
        tuple(f.name for f in fields(Config) if f.name not in EVIDENCE_LEFT_OUT),
        _evidence_options,
        defaults=EVIDENCE_DEFAULTS,
        ratios=True,
        recipe=EVIDENCE_RECIPE,
    ),
    "promote": Command("Retrain the study's best student, register it and promote it if it beats the champion.", promote_command),
    "report": Command(
        "Write the methodology and results sections (Markdown and LaTeX) of a registered version from its tracked runs.",
        report_command,
        ("model_name", "comparison"),
        report_options,
    ),
    "explain": Command(
        "Grad-CAM of a registered student and its teacher on one scan (writes an overlay PNG), or the pointing game on tumour "
        "scans with boxes (--boxes_dir; logged to the version's promote run).",
        explain_command,
        ("model_name", "boxes_dir"),
        explain_options,
    ),
    "evaluate": Command(
        "External validation of a registered version on labelled data from elsewhere: classes matched by name, images the "
        "version already saw dropped, metrics with 95 percent bootstrap intervals; logged as a run named evaluate, linked to the version.",
        evaluate_command,
        ("data_dir", "modality", "class_map", "dedupe", "seed", "model_name", "experiment_name", "cache_dir", "storage"),
        evaluate_options,
    ),
    "card": Command(
        "Write the model card of a registered version from its tracked runs (after a new evaluation, say): model_card.md on "
        "the version's run, its summary as the version's description.",
        card_command,
        ("model_name",),
        card_options,
    ),
    "fetch": Command("Show the version a stage or alias points at: metrics and lineage.", fetch_command, ("model_name",), version_options),
    "history": Command("Every promotion and rollback: who, when, which version, why.", history_command, ("model_name",)),
    "rollback": Command(
        "Restore the previous champion (Production + alias champion).",
        rollback_command,
        ("model_name",),
        lambda parser: parser.add_argument("--reason", default="manual rollback"),
    ),
    "export": Command(
        "Export a registered student to TFLite float32 and INT8; log files, latency and hold-out F1 to its run.",
        export_command,
        options=lambda parser: parser.add_argument("--version", default=None, help="model version; default: the champion"),
    ),
    "server": Command("Start the MLflow tracking and model-registry server.", server_command, (), server_options),
    "serve": Command(
        "Serve a registered model like `mlflow models serve`, answering every malformed request with 4xx.",
        serve_command,
        (),
        serve_options,
        add_help=False,
    ),
}


def build_command_parser() -> argparse.ArgumentParser:
    """``kd``'s own parser: which command (each command parses its options itself)."""
    parser = argparse.ArgumentParser(
        prog="kd", description=__doc__.split("\n\n")[0].replace("``", ""), epilog="`kd <command> --help` lists its options."
    )
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.description, add_help=False)
    return parser


def run_command(name: str, argv: list[str] | None = None) -> Any:
    """Parse the command's options, check its Config, then import what it runs and run it."""
    command = COMMANDS[name]
    try:
        parser = command.parser(name, command.chosen_recipe(sys.argv[1:] if argv is None else argv))
    except PipelineError as error:  # an unknown recipe: one line, before anything heavy is imported
        fail(str(error))

    def run(args: argparse.Namespace) -> Any:
        set_verbosity(args.verbosity)
        args.command_line = list(sys.argv[1:] if argv is None else argv)  # as given (kd evidence records it)
        # The run `mlflow run` started for this entry point, resolved here once and passed down to the step that logs
        # into it. Taken out of the environment: left there, every start_run below (nested runs, subprocesses) would
        # resume it as its own.
        args.launched_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
        if args.launched_run_id:
            from pipelines.tracking.runs import name_launched_run

            name_launched_run(args.launched_run_id)
        cfg = config_from_args(args)
        if not command.ratios:
            cfg.imbalance_ratio  # noqa: B018 - a list of ratios is refused here, before anything heavy is imported
        else:  # the commands that run a comparison
            cfg.check_comparison()
        return command.run(cfg, args)

    return run_cli(run, parser, argv)


def main(argv: list[str] | None = None) -> None:
    """The ``kd`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    build_command_parser().parse_args(argv[:1])  # --help, a missing or unknown command: argparse answers and exits
    run_command(argv[0], argv[1:])
