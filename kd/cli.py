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

from pipelines.cli import fail, run_cli
from pipelines.config import (
    BOOTSTRAP_RESAMPLES,
    COMPARE_DEFAULTS,
    DATA_INPUTS,
    PROJECT_ROOT,
    Config,
    PipelineError,
    build_parser,
    config_from_args,
)
from pipelines.recipes import EVIDENCE_DEFAULTS, EVIDENCE_RECIPE, RECIPES, check_evidence, recipe_values

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
        return parser

    def chosen_recipe(self, argv: list[str]) -> str:
        """The ``--recipe`` in ``argv`` (or the command's default), read before the command's own parser is built."""
        if self.recipe is None:
            return ""
        early = argparse.ArgumentParser(add_help=False)
        early.add_argument("--recipe", default=self.recipe)
        return early.parse_known_args(argv)[0].recipe


def _version_options(parser: argparse.ArgumentParser) -> None:
    """``--stage`` / ``--alias`` (empty = not given, as MLproject passes them)."""
    # Not argparse-exclusive: MLproject passes both, one of them empty; giving both is refused when resolving.
    parser.add_argument("--stage", default=None, help="Production, Staging, Archived or None (default Production)")
    parser.add_argument("--alias", default=None, help="e.g. champion or challenger")


def _stage_and_alias(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The version to use: the given stage or alias, else Production."""
    stage, alias = args.stage or None, args.alias or None
    return (stage or ("Production" if alias is None else None)), alias


def _version_number_options(parser: argparse.ArgumentParser) -> None:
    """``--stage`` / ``--alias`` / ``--version`` (a version number): one of them, Production when none is given."""
    _version_options(parser)
    parser.add_argument("--version", default=None, help="a version number, instead of --stage or --alias")


def _version_number(cfg: Config, args: argparse.Namespace) -> str:
    """The version number ``--version`` gives, or the one the stage or alias points at."""
    from pipelines.config import PipelineError
    from registry.fetch import resolve_version

    if args.version and (args.stage or args.alias):
        raise PipelineError(f"--version {args.version} with --stage/--alias: give one of them")
    stage, alias = (None, None) if args.version else _stage_and_alias(args)
    return resolve_version(cfg.model_name, stage, alias, args.version or None).version


def _prepare(cfg: Config, args: argparse.Namespace) -> str:
    from pipelines.prepare import prepare

    return prepare(cfg)


def _teacher(cfg: Config, args: argparse.Namespace) -> str:
    from pipelines.teacher import train_teacher

    return train_teacher(cfg)


def _distill(cfg: Config, args: argparse.Namespace) -> str:
    from pipelines.distill import distill

    return distill(cfg)


def _search(cfg: Config, args: argparse.Namespace) -> Any:
    from search.tune import run_search

    return run_search(cfg)


def _compare(cfg: Config, args: argparse.Namespace) -> str:
    from search.compare import run_comparison

    return run_comparison(cfg)


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

    return run_evidence(cfg, args.out_dir, args.main_folds, args.main_repeats, args.recipe, args.command_line)


def _main(cfg: Config, args: argparse.Namespace) -> dict[str, str]:
    from kd.main import run_main

    return run_main(cfg)


def _promote(cfg: Config, args: argparse.Namespace) -> Any:
    from registry.promote import promote

    return promote(cfg)


def _report_options(parser: argparse.ArgumentParser) -> None:
    from registry.report import BOOTSTRAP_RESAMPLES

    _version_options(parser)
    parser.add_argument("--out-dir", "--out_dir", dest="out_dir", default="", help="folder to write; empty = reports/<model>-v<version>")
    # Named like the Config field, so config_from_args refuses a password in it (it would be logged with `mlflow run`'s parameters).
    parser.add_argument(
        "--storage",
        default="",
        help="Optuna storage URL of the study, without a password; empty = $KD_STORAGE_URL, else the one the search recorded",
    )
    parser.add_argument(
        "--resamples", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples for the hold-out confidence intervals"
    )


def _report(cfg: Config, args: argparse.Namespace) -> Any:
    from registry.report import write_report

    return write_report(
        cfg.model_name,
        *_stage_and_alias(args),
        out_dir=args.out_dir or None,
        storage=args.storage,
        resamples=args.resamples,
        comparison=cfg.comparison,
    )


def _explain_options(parser: argparse.ArgumentParser) -> None:
    _version_options(parser)
    parser.add_argument("image", nargs="?", default="", help="the scan (any image file the data loader reads); optional with --boxes_dir")
    parser.add_argument("--out", default="", help="overlay PNG; empty = <image name>.gradcam.png next to the image")
    parser.add_argument(
        "--class-name", "--class_name", dest="class_name", default=None, help="class to explain; default = the predicted class"
    )


def _explain(cfg: Config, args: argparse.Namespace) -> Any:
    from pipelines.config import PipelineError

    if not args.image and not cfg.boxes_dir:
        raise PipelineError("give a scan to explain, or --boxes_dir with annotated tumour scans for the pointing game")
    if cfg.boxes_dir:
        from registry.pointing import explain_boxes

        explain_boxes(cfg.model_name, cfg.boxes_dir, *_stage_and_alias(args))
    if args.image:
        from registry.explain import explain

        return explain(cfg.model_name, args.image, *_stage_and_alias(args), out_path=args.out or None, class_name=args.class_name)
    return None


def _evaluate_options(parser: argparse.ArgumentParser) -> None:
    _version_options(parser)
    parser.add_argument("--version", default=None, help="a version number, instead of --stage or --alias")
    parser.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples for the 95%% intervals")


def _evaluate(cfg: Config, args: argparse.Namespace) -> str:
    from registry.external import evaluate_version

    stage, alias = (None, None) if args.version else _stage_and_alias(args)
    return evaluate_version(cfg, stage, alias, args.version or None, args.resamples)


def _card_options(parser: argparse.ArgumentParser) -> None:
    _version_number_options(parser)
    parser.add_argument("--out-dir", "--out_dir", dest="out_dir", default="", help="folder to write; empty = reports/<model>-v<version>")


def _card(cfg: Config, args: argparse.Namespace) -> Any:
    from registry.card import CARD_ARTIFACT, description, write_card

    version = _version_number(cfg, args)
    out_dir = args.out_dir or PROJECT_ROOT / "reports" / f"{cfg.model_name}-v{version}"
    card, path = write_card(cfg.model_name, version, out_dir)
    print(description(card))
    print(f"card: {cfg.model_name} v{version} -> {path} (also {CARD_ARTIFACT} of the version's run; its summary is the description)")
    return path


def _fetch(cfg: Config, args: argparse.Namespace) -> None:
    from registry.fetch import describe, resolve_version

    print(describe(resolve_version(cfg.model_name, *_stage_and_alias(args))))


def _history(cfg: Config, args: argparse.Namespace) -> None:
    from registry.roles import history

    for entry in history(cfg.model_name):
        # an evaluation moves no role: it has no previous version to name
        was = "" if entry["event"] == "evaluate" else f"(was v{entry['previous'] or '-'})"
        print(f"{entry['when']}  {entry['event']:<10} v{entry['version']:<4} {was:<9}  by {entry['who']}: {entry['why']}")


def _rollback(cfg: Config, args: argparse.Namespace) -> str:
    from registry.roles import rollback

    return rollback(cfg.model_name, args.reason)


def _export(cfg: Config, args: argparse.Namespace) -> Any:
    from registry.export import export_edge

    return export_edge(cfg, args.version)


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend-store-uri",
        default=os.environ.get("KD_BACKEND_STORE_URI", f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"),
        help="SQLAlchemy URL of the tracking store",
    )
    parser.add_argument(
        "--artifacts-destination",
        default=os.environ.get("KD_ARTIFACTS_DESTINATION", str(PROJECT_ROOT / "mlartifacts")),
        help="local folder or s3://bucket/prefix",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--auth", action="store_true", help="require MLflow basic-auth logins (first start: set MLFLOW_AUTH_ADMIN_PASSWORD)"
    )
    parser.add_argument(
        "--auth-database-uri",
        default=f"sqlite:///{PROJECT_ROOT / 'mlflow-auth.db'}",
        help="SQLAlchemy URL of the users and permissions database",
    )


def _server(cfg: Config, args: argparse.Namespace) -> None:
    from registry.server import start_server

    start_server(args.backend_store_uri, args.artifacts_destination, args.host, args.port, args.auth, args.auth_database_uri)


def _serve_options(parser: argparse.ArgumentParser) -> None:
    # -h is the host, as in `mlflow models serve` (the same command line works for both); help is --help only.
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument(
        "-m", "--model-uri", required=True, help="e.g. models:/brain-tumor-student/Production (MLFLOW_TRACKING_URI says where)"
    )
    parser.add_argument("-h", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5001)


def _serve(cfg: Config, args: argparse.Namespace) -> None:
    from registry.serve import serve

    serve(args.model_uri, args.host, args.port)


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
    "promote": Command("Retrain the study's best student, register it and promote it if it beats the champion.", _promote),
    "report": Command(
        "Write the methodology and results sections (Markdown and LaTeX) of a registered version from its tracked runs.",
        _report,
        ("model_name", "comparison"),
        _report_options,
    ),
    "explain": Command(
        "Grad-CAM of a registered student and its teacher on one scan (writes an overlay PNG), or the pointing game on tumour "
        "scans with boxes (--boxes_dir; logged to the version's promote run).",
        _explain,
        ("model_name", "boxes_dir"),
        _explain_options,
    ),
    "evaluate": Command(
        "External validation of a registered version on labelled data from elsewhere: classes matched by name, images the "
        "version already saw dropped, metrics with 95 percent bootstrap intervals; logged as a run named evaluate, linked to the version.",
        _evaluate,
        ("data_dir", "modality", "class_map", "dedupe", "seed", "model_name", "experiment_name", "cache_dir", "storage"),
        _evaluate_options,
    ),
    "card": Command(
        "Write the model card of a registered version from its tracked runs (after a new evaluation, say): model_card.md on "
        "the version's run, its summary as the version's description.",
        _card,
        ("model_name",),
        _card_options,
    ),
    "fetch": Command("Show the version a stage or alias points at: metrics and lineage.", _fetch, ("model_name",), _version_options),
    "history": Command("Every promotion and rollback: who, when, which version, why.", _history, ("model_name",)),
    "rollback": Command(
        "Restore the previous champion (Production + alias champion).",
        _rollback,
        ("model_name",),
        lambda parser: parser.add_argument("--reason", default="manual rollback"),
    ),
    "export": Command(
        "Export a registered student to TFLite float32 and INT8; log files, latency and hold-out F1 to its run.",
        _export,
        options=lambda parser: parser.add_argument("--version", default=None, help="model version; default: the champion"),
    ),
    "server": Command("Start the MLflow tracking and model-registry server.", _server, (), _server_options),
    "serve": Command(
        "Serve a registered model like `mlflow models serve`, answering every malformed request with 4xx.",
        _serve,
        (),
        _serve_options,
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
        args.command_line = list(sys.argv[1:] if argv is None else argv)  # as given (kd evidence records it)
        cfg = config_from_args(args)
        if not command.ratios:
            cfg.imbalance_ratio  # noqa: B018 - a list of ratios is refused here, before anything heavy is imported
        return command.run(cfg, args)

    return run_cli(run, parser, argv)


def main(argv: list[str] | None = None) -> None:
    """The ``kd`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    build_command_parser().parse_args(argv[:1])  # --help, a missing or unknown command: argparse answers and exits
    run_command(argv[0], argv[1:])
