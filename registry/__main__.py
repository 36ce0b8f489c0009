"""``python -m registry {promote,fetch,history,rollback,report,explain}``: the registry from the shell."""

from __future__ import annotations

import argparse
import sys

from pipelines.cli import run_cli
from pipelines.config import Config, build_parser, check_storage_parameter, config_from_args


def _promote(argv: list[str]) -> None:
    def step(args: argparse.Namespace) -> None:
        cfg = config_from_args(args)  # checked before TensorFlow and the stores are imported
        from registry.promote import promote

        promote(cfg)

    parser = build_parser("Retrain the study's best student, register it and promote it if it beats the champion.")
    run_cli(step, parser, argv)


def _version_parser(description: str) -> argparse.ArgumentParser:
    """``--model-name`` and one of ``--stage`` / ``--alias`` (empty = not given, as MLproject passes them)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-name", "--model_name", dest="model_name", default=Config().model_name)
    # Not argparse-exclusive: MLproject passes both, one of them empty; giving both is refused when resolving.
    parser.add_argument("--stage", default=None, help="Production, Staging, Archived or None (default Production)")
    parser.add_argument("--alias", default=None, help="e.g. champion or challenger")
    return parser


def _stage_and_alias(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The version to use: the given stage or alias, else Production."""
    stage, alias = args.stage or None, args.alias or None
    return (stage or ("Production" if alias is None else None)), alias


def _fetch(argv: list[str]) -> None:
    from registry.fetch import describe, resolve_version

    parser = _version_parser("Show the version a stage or alias points at: metrics and lineage.")
    run_cli(lambda args: print(describe(resolve_version(args.model_name, *_stage_and_alias(args)))), parser, argv)


def _report(argv: list[str]) -> None:
    from registry.report import BOOTSTRAP_RESAMPLES, write_report

    parser = _version_parser(
        "Write the methodology and results sections (Markdown and LaTeX) of a registered version from its tracked runs."
    )
    parser.add_argument("--out-dir", "--out_dir", dest="out_dir", default="", help="folder to write; empty = reports/<model>-v<version>")
    parser.add_argument(
        "--storage",
        default="",
        help="Optuna storage URL of the study, without a password; empty = $KD_STORAGE_URL, else the one the search recorded",
    )
    parser.add_argument(
        "--resamples", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples for the hold-out confidence intervals"
    )

    def step(args: argparse.Namespace) -> None:
        check_storage_parameter(args.storage)  # a password here would be logged with `mlflow run`'s parameters
        write_report(args.model_name, *_stage_and_alias(args), out_dir=args.out_dir or None, storage=args.storage, resamples=args.resamples)

    run_cli(step, parser, argv)


def _explain(argv: list[str]) -> None:
    from registry.explain import explain

    parser = _version_parser("Grad-CAM of a registered student and its teacher on one scan: writes an overlay PNG.")
    parser.add_argument("image", help="the scan (any image file the data loader reads)")
    parser.add_argument("--out", default="", help="overlay PNG; empty = <image name>.gradcam.png next to the image")
    parser.add_argument(
        "--class-name", "--class_name", dest="class_name", default=None, help="class to explain; default = the predicted class"
    )
    run_cli(
        lambda args: explain(args.model_name, args.image, *_stage_and_alias(args), out_path=args.out or None, class_name=args.class_name),
        parser,
        argv,
    )


def _history(argv: list[str]) -> None:
    from registry.roles import history

    parser = argparse.ArgumentParser(description="Every promotion and rollback: who, when, which version, why.")
    parser.add_argument("--model-name", "--model_name", dest="model_name", default=Config().model_name)

    def show(args: argparse.Namespace) -> None:
        for entry in history(args.model_name):
            print(
                f"{entry['when']}  {entry['event']:<10} v{entry['version']:<4} (was v{entry['previous'] or '-'})  by {entry['who']}: {entry['why']}"
            )

    run_cli(show, parser, argv)


def _rollback(argv: list[str]) -> None:
    from registry.roles import rollback

    parser = argparse.ArgumentParser(description="Restore the previous champion (Production + alias champion).")
    parser.add_argument("--model-name", "--model_name", dest="model_name", default=Config().model_name)
    parser.add_argument("--reason", default="manual rollback")
    run_cli(lambda args: rollback(args.model_name, args.reason), parser, argv)


COMMANDS = {"promote": _promote, "fetch": _fetch, "history": _history, "rollback": _rollback, "report": _report, "explain": _explain}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m registry {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        sys.exit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
