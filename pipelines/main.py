"""Entry point ``main``: prepare -> teacher -> distill, reusing every finished step whose data and parameters match.

(The search and promotion steps join this chain when they exist.)
"""

from __future__ import annotations

import os

import mlflow

from pipelines.cli import run_cli
from pipelines.config import Config, build_parser, config_from_args
from pipelines.distill import distill
from pipelines.prepare import prepare, prepare_data
from pipelines.teacher import train_teacher
from pipelines.tracking import STEP_TAG


def run_main(cfg: Config) -> dict[str, str]:
    """Run the chain under one parent run; returns the run id of each step."""
    prepared = prepare_data(cfg)
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(cfg.experiment_name)
    with mlflow.start_run(run_name=None if os.environ.get("MLFLOW_RUN_ID") else "main") as parent:
        mlflow.set_tag(STEP_TAG, "main")
        runs = {
            "prepare": prepare(cfg, prepared, nested=True),
            "teacher": train_teacher(cfg, prepared, nested=True),
            "distill": distill(cfg, prepared, nested=True),
        }
        mlflow.set_tags({f"kd.{step}_run_id": run_id for step, run_id in runs.items()})
        student = mlflow.get_run(runs["distill"]).data.metrics
        teacher = mlflow.get_run(runs["teacher"]).data.metrics
        mlflow.log_metrics({"student_f1_mean": student["f1_mean"], "teacher_f1_mean": teacher["f1_mean"]})
    tracking_uri = mlflow.get_tracking_uri()
    print("\nDone. Where to look:")
    print(f"  tracking store : {tracking_uri}")
    print(f"  main run       : {parent.info.run_id}")
    for step, run_id in runs.items():
        print(f"  {step:<15}: {run_id}")
    print(f"  teacher F1     : {teacher['f1_mean']:.4f} ± {teacher['f1_std']:.4f}  ({int(teacher['teacher_params']):,} parameters)")
    print(f"  student F1     : {student['f1_mean']:.4f} ± {student['f1_std']:.4f}  ({int(student['student_params']):,} parameters)")
    print(f"  browse         : mlflow ui --backend-store-uri {tracking_uri}")
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = build_parser("Run prepare -> teacher -> distill, reusing finished steps.")
    run_cli(lambda args: run_main(config_from_args(args)), parser, argv)


if __name__ == "__main__":
    main()
