"""``python -m benchmarks.arguments``: how long each CLI takes to refuse a bad argument (CPU and wall seconds).

Issue 13: bad arguments used to be refused after TensorFlow, MLflow and the data were loaded (33-200 s); the
target is under 5 s of CPU. Each CLI runs as a user runs it, in a fresh process, with ``image_size=100000``;
``--mlflow-run`` adds ``mlflow run -e teacher``, which pays for MLflow's own start-up and run creation first
(the CPU of a process includes the children it waited for).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from pipelines.config import PROJECT_ROOT

TARGET_CPU_S = 5.0
# as users run them (`kd <command>`; `python -m kd` is the same code without the console script's launcher)
CLIS = {f"kd {name}": [sys.executable, "-m", "kd", name] for name in ("teacher", "distill", "main", "search", "promote")}


def refusal_cost(command: list[str], env: dict[str, str]) -> dict:
    """Wall and CPU (user + system) seconds of one process that must exit 2."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    error = process.stderr.read().decode(errors="replace").strip().splitlines()
    process.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    return {
        "exit_code": code,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "wall_s": round(wall, 2),
        "last_line": error[-1] if error else "",
        "met": code == 2 and usage.ru_utime + usage.ru_stime < TARGET_CPU_S,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure how fast each CLI refuses a bad argument.")
    parser.add_argument("--mlflow-run", action="store_true", help="also `mlflow run . -e teacher` (a temporary tracking store)")
    args = parser.parse_args(argv)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    commands = {name: [*command, "--image_size", "100000"] for name, command in CLIS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.mlflow_run:
            from mlflow import MlflowClient

            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
            MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()  # the store's schema exists, as on a used machine
            commands["mlflow run . -e teacher"] = [
                os.path.join(os.path.dirname(sys.executable), "mlflow"),
                "run",
                str(PROJECT_ROOT),
                "-e",
                "teacher",
                "--env-manager",
                "local",
                "-P",
                "image_size=100000",
            ]
        results = {name: refusal_cost(command, env) for name, command in commands.items()}
    print(json.dumps({"target_cpu_s": TARGET_CPU_S, "bad_argument": "image_size=100000", "results": results}, indent=2))


if __name__ == "__main__":
    main()
