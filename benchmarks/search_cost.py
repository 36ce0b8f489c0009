"""Part 2: the same search done naively (online teacher, every fold of every trial) vs ours (cached logits,
fold pruning), each in its own process so its wall time and peak memory are its own.

``ours`` is the project's ``run_search``. ``naive`` replays ours' trials with the very same parameters (so both
cover the same candidates) through the same ``cross_validate_student``, online and without pruning.
The teachers are trained before either starts, as both share them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Bench, ratio, target
from pipelines.config import Config
from pipelines.names import Metric

STRATEGIES = ("ours", "naive")


def run_ours(cfg: Config) -> dict:
    from search.study import best_trial
    from search.tune import run_search

    start = time.perf_counter()
    study = run_search(cfg)
    wall = time.perf_counter() - start
    best = best_trial(study)
    trials = [t for t in study.trials if "fold_f1" in t.user_attrs]
    return {
        "wall_s": wall,
        "best_f1": best.values[0],
        "best_f1_std": best.user_attrs.get("f1_std", float("nan")),
        "best_params": best.params,
        "trials": len(trials),
        "pruned": sum(t.state.name == "PRUNED" for t in trials),
        "folds_trained": sum(len(t.user_attrs["fold_f1"]) for t in trials),
    }


def run_naive(cfg: Config) -> dict:
    import mlflow
    import numpy as np
    import optuna

    from pipelines.steps.distill import cross_validate_student
    from pipelines.steps.prepare import prepare_data
    from pipelines.steps.teacher import train_teacher
    from search.space import SearchSpace

    trials = sorted(
        optuna.load_study(study_name=cfg.study_name, storage=cfg.storage_url).get_trials(
            states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        ),
        key=lambda t: t.number,
    )
    space = SearchSpace.from_config(cfg)
    start = time.perf_counter()
    prepared = prepare_data(cfg)
    teacher_run_id = train_teacher(cfg, prepared)  # found, not retrained
    mlflow.set_experiment(cfg.experiment_name)
    scores = []
    with mlflow.start_run(run_name="naive-search"):
        for trial in trials:
            _, trial_cfg = space.suggest(optuna.trial.FixedTrial(trial.params), cfg.replace(teacher_mode="online"))
            with mlflow.start_run(nested=True, run_name=f"naive-trial-{trial.number}"):
                cv = cross_validate_student(trial_cfg, prepared, teacher_run_id, list(range(cfg.fold_count)))
            summary = cv.summary()
            scores.append((summary[Metric.F1_MEAN], summary[Metric.F1_STD], trial.params))
    wall = time.perf_counter() - start
    best = int(np.argmax([s[0] for s in scores]))
    return {
        "wall_s": wall,
        "best_f1": scores[best][0],
        "best_f1_std": scores[best][1],
        "best_params": scores[best][2],
        "trials": len(trials),
        "pruned": 0,
        "folds_trained": len(trials) * cfg.fold_count,
    }


def vm_hwm_mib(pid: str = "self") -> float:
    """A process's peak resident memory since its exec (VmHWM).

    Not ``getrusage``: on Linux a child's ``ru_maxrss`` starts at its parent's resident size at fork time,
    so every child of the benchmark would report at least the benchmark's own memory.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def peak_rss_mib() -> float:
    """This process's peak resident memory plus that of its live children (the fold workers, ``fold_workers`` > 1, which
    stay up for the next trial): a search's memory is all of its processes'."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rpartition(")")[2].split()[1] == str(os.getpid()):
                children.append(vm_hwm_mib(stat.parent.name))
        except (OSError, RuntimeError):  # a process that ended while it was read
            continue
    return vm_hwm_mib() + sum(children)


def run_strategy(strategy: str, cfg: Config, tracking_uri: str, work: Path) -> dict:
    """Run one strategy in a child process of its own; its result, peak resident memory included."""
    config_path, result_path = work / f"search_{strategy}_config.json", work / f"search_{strategy}_result.json"
    config_path.write_text(json.dumps(cfg.__dict__))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "CI": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    child = subprocess.run([sys.executable, "-m", "benchmarks.search_cost", strategy, str(config_path), str(result_path)], env=env)
    if child.returncode != 0:
        raise RuntimeError(f"search strategy {strategy!r} failed with exit code {child.returncode}")
    return json.loads(result_path.read_text())


def run(bench: Bench) -> dict:
    measured = {}
    for strategy in STRATEGIES:  # ours first: naive replays its trials
        print(f"part 2: search, {strategy}")
        measured[strategy] = run_strategy(strategy, bench.cfg, bench.tracking_uri, bench.work)
    ours, naive = measured["ours"], measured["naive"]
    cheaper = ratio(naive["wall_s"], ours["wall_s"])
    gap = abs(ours["best_f1"] - naive["best_f1"])
    result = {
        **measured,
        "naive_vs_ours_wall": cheaper,
        "best_f1_gap": gap,
        "setup": {
            "trials": bench.cfg.n_trials,
            "folds": bench.cfg.folds,
            "epochs": bench.cfg.epochs,
            "patience": bench.cfg.patience,
            "seed": bench.cfg.seed,
            "pruner": "MedianPruner(n_startup_trials=2, n_warmup_steps=1) per fold",
            "image_size": bench.cfg.image_size,
        },
        "targets": [
            target("ours >= 4x cheaper than naive (wall time)", cheaper, 4.0),
            target(
                "best-F1 gap between ours and naive <= fold-to-fold F1 std of ours' best trial", gap, ours["best_f1_std"], at_least=False
            ),
        ],
    }
    print(
        f"part 2: naive {naive['wall_s']:.1f} s vs ours {ours['wall_s']:.1f} s -> {cheaper:.2f}x cheaper; "
        f"best F1 {naive['best_f1']:.4f} vs {ours['best_f1']:.4f}"
    )
    return result


def main(argv: list[str]) -> None:
    strategy, config_path, result_path = argv
    cfg = Config(**json.loads(Path(config_path).read_text()))
    result = {"ours": run_ours, "naive": run_naive}[strategy](cfg)
    Path(result_path).write_text(json.dumps({**result, "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main(sys.argv[1:])
