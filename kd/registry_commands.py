"""The ``kd`` commands of the registry and serving tools (promote, report, explain, evaluate, card, fetch, history,
rollback, export, server, serve): each parses nothing itself, imports its module only when run, and calls the same
function as its MLproject entry point (the command table is :data:`kd.cli.COMMANDS`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pipelines.config import BOOTSTRAP_RESAMPLES, PROJECT_ROOT, Config, PipelineError


def version_options(parser: argparse.ArgumentParser) -> None:
    """``--stage`` / ``--alias`` (empty = not given, as MLproject passes them)."""
    # Not argparse-exclusive: MLproject passes both, one of them empty; giving both is refused when resolving.
    parser.add_argument("--stage", default=None, help="Production, Staging, Archived or None (default Production)")
    parser.add_argument("--alias", default=None, help="e.g. champion or challenger")


def stage_and_alias(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The version to use: the given stage or alias, else Production."""
    stage, alias = args.stage or None, args.alias or None
    return (stage or ("Production" if alias is None else None)), alias


def version_number_options(parser: argparse.ArgumentParser) -> None:
    """``--stage`` / ``--alias`` / ``--version`` (a version number): one of them, Production when none is given."""
    version_options(parser)
    parser.add_argument("--version", default=None, help="a version number, instead of --stage or --alias")


def version_number(cfg: Config, args: argparse.Namespace) -> str:
    """The version number ``--version`` gives, or the one the stage or alias points at."""
    from registry.fetch import resolve_version

    if args.version and (args.stage or args.alias):
        raise PipelineError(f"--version {args.version} with --stage/--alias: give one of them")
    stage, alias = (None, None) if args.version else stage_and_alias(args)
    return resolve_version(cfg.model_name, stage, alias, args.version or None).version


def promote_command(cfg: Config, args: argparse.Namespace) -> Any:
    from registry.promote import promote

    return promote(cfg, launched_run_id=args.launched_run_id)


def report_options(parser: argparse.ArgumentParser) -> None:
    from registry.report import BOOTSTRAP_RESAMPLES

    version_options(parser)
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


def report_command(cfg: Config, args: argparse.Namespace) -> Any:
    from registry.report import write_report

    return write_report(
        cfg.model_name,
        *stage_and_alias(args),
        out_dir=args.out_dir or None,
        storage=args.storage,
        resamples=args.resamples,
        comparison=cfg.comparison,
        launched_run_id=args.launched_run_id,
    )


def explain_options(parser: argparse.ArgumentParser) -> None:
    version_options(parser)
    parser.add_argument("image", nargs="?", default="", help="the scan (any image file the data loader reads); optional with --boxes_dir")
    parser.add_argument("--out", default="", help="overlay PNG; empty = <image name>.gradcam.png next to the image")
    parser.add_argument(
        "--class-name", "--class_name", dest="class_name", default=None, help="class to explain; default = the predicted class"
    )


def explain_command(cfg: Config, args: argparse.Namespace) -> Any:

    if not args.image and not cfg.boxes_dir:
        raise PipelineError("give a scan to explain, or --boxes_dir with annotated tumour scans for the pointing game")
    if cfg.boxes_dir:
        from registry.pointing import explain_boxes

        explain_boxes(cfg.model_name, cfg.boxes_dir, *stage_and_alias(args))
    if args.image:
        from registry.explain import explain

        return explain(cfg.model_name, args.image, *stage_and_alias(args), out_path=args.out or None, class_name=args.class_name)
    return None


def evaluate_options(parser: argparse.ArgumentParser) -> None:
    version_options(parser)
    parser.add_argument("--version", default=None, help="a version number, instead of --stage or --alias")
    parser.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples for the 95%% intervals")


def evaluate_command(cfg: Config, args: argparse.Namespace) -> str:
    from registry.external import evaluate_version

    stage, alias = (None, None) if args.version else stage_and_alias(args)
    return evaluate_version(cfg, stage, alias, args.version or None, args.resamples, args.launched_run_id)


def card_options(parser: argparse.ArgumentParser) -> None:
    version_number_options(parser)
    parser.add_argument("--out-dir", "--out_dir", dest="out_dir", default="", help="folder to write; empty = reports/<model>-v<version>")


def card_command(cfg: Config, args: argparse.Namespace) -> Any:
    from registry.card import CARD_ARTIFACT, description, write_card

    version = version_number(cfg, args)
    out_dir = args.out_dir or PROJECT_ROOT / "reports" / f"{cfg.model_name}-v{version}"
    card, path = write_card(cfg.model_name, version, out_dir)
    print(description(card))
    print(f"card: {cfg.model_name} v{version} -> {path} (also {CARD_ARTIFACT} of the version's run; its summary is the description)")
    return path


def fetch_command(cfg: Config, args: argparse.Namespace) -> None:
    from registry.fetch import describe, resolve_version

    print(describe(resolve_version(cfg.model_name, *stage_and_alias(args))))


def history_command(cfg: Config, args: argparse.Namespace) -> None:
    from registry.roles import history

    for entry in history(cfg.model_name):
        # an evaluation moves no role: it has no previous version to name
        was = "" if entry["event"] == "evaluate" else f"(was v{entry['previous'] or '-'})"
        print(f"{entry['when']}  {entry['event']:<10} v{entry['version']:<4} {was:<9}  by {entry['who']}: {entry['why']}")


def rollback_command(cfg: Config, args: argparse.Namespace) -> str:
    from registry.roles import rollback

    return rollback(cfg.model_name, args.reason)


def export_command(cfg: Config, args: argparse.Namespace) -> Any:
    from registry.export import export_edge

    return export_edge(cfg, args.version)


def server_options(parser: argparse.ArgumentParser) -> None:
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


def server_command(cfg: Config, args: argparse.Namespace) -> None:
    from registry.server import start_server

    start_server(args.backend_store_uri, args.artifacts_destination, args.host, args.port, args.auth, args.auth_database_uri)


def serve_options(parser: argparse.ArgumentParser) -> None:
    # -h is the host, as in `mlflow models serve` (the same command line works for both); help is --help only.
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument(
        "-m", "--model-uri", required=True, help="e.g. models:/brain-tumor-student/Production (MLFLOW_TRACKING_URI says where)"
    )
    parser.add_argument("-h", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5001)


def serve_command(cfg: Config, args: argparse.Namespace) -> None:
    from registry.serve import serve

    serve(args.model_uri, args.host, args.port)
