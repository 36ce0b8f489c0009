"""``python -m registry {promote,fetch,history,rollback,serve-command}``: the registry from the shell."""

from __future__ import annotations

import argparse
import sys

from pipelines.cli import run_cli
from pipelines.config import Config, build_parser, config_from_args


def _promote(argv: list[str]) -> None:
    from registry.promote import promote

    parser = build_parser("Retrain the study's best student, register it and promote it if it beats the champion.")
    run_cli(lambda args: promote(config_from_args(args)), parser, argv)


def _fetch(argv: list[str]) -> None:
    from registry.fetch import describe, resolve_version

    parser = argparse.ArgumentParser(description="Show the version a stage or alias points at: metrics and lineage.")
    parser.add_argument("--model-name", "--model_name", dest="model_name", default=Config().model_name)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--stage", default=None)
    group.add_argument("--alias", default=None)
    run_cli(lambda args: print(describe(resolve_version(args.model_name, args.stage if args.stage or args.alias else "Production", args.alias))), parser, argv)


def _history(argv: list[str]) -> None:
    from registry.promote import history

    parser = argparse.ArgumentParser(description="Every promotion and rollback: who, when, which version, why.")
    parser.add_argument("--model-name", "--model_name", dest="model_name", default=Config().model_name)

    def show(args: argparse.Namespace) -> None:
        for entry in history(args.model_name):
            print(f"{entry['when']}  {entry['event']:<10} v{entry['version']:<4} (was v{entry['previous'] or '-'})  by {entry['who']}: {entry['why']}")

    run_cli(show, parser, argv)


def _rollback(argv: list[str]) -> None:
    from registry.promote import rollback

    parser = argparse.ArgumentParser(description="Restore the previous champion (Production + alias champion).")
    parser.add_argument("--model-name", "--model_name", dest="model_name", default=Config().model_name)
    parser.add_argument("--reason", default="manual rollback")
    run_cli(lambda args: rollback(args.model_name, args.reason), parser, argv)


COMMANDS = {"promote": _promote, "fetch": _fetch, "history": _history, "rollback": _rollback}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m registry {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        sys.exit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
