"""``python -m kd <command> [options]``: the ``kd`` console script, for environments that do not install the project
(MLproject's commands run this way, since ``mlflow run`` builds conda.yaml's environment without the project)."""

from kd.cli import main

if __name__ == "__main__":
    main()
