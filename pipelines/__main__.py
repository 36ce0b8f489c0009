"""``python -m pipelines {prepare,teacher,distill,main} [options]``: a step's CLI (what MLproject runs), with every
argument checked before TensorFlow, the data or a store is touched. ``python -m pipelines.<step>`` is the same
CLI, checked after the step's imports."""

import sys

from pipelines.cli import STEPS, run_step


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STEPS:
        print(f"usage: python -m pipelines {{{','.join(STEPS)}}} [options]  (--help after a step lists its options)", file=sys.stderr)
        sys.exit(2)
    run_step(argv[0], argv[1:])


if __name__ == "__main__":
    main()
