"""``python -m search``: run a search worker (create the study or join it)."""

from pipelines.cli import run_cli
from pipelines.config import build_parser, config_from_args


def _search(args) -> None:
    cfg = config_from_args(args)  # checked before TensorFlow, Optuna and the stores are imported
    from search.tune import run_search

    run_search(cfg)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(
        "Optuna search of temperature, alpha, student size and learning rate by k-fold F1. Start more workers with the same --storage and --study-name to share the study."
    )
    run_cli(_search, parser, argv)


if __name__ == "__main__":
    main()
