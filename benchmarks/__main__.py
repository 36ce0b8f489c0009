"""``python -m benchmarks [--smoke]``: teacher -> search -> promote in a temporary store, then every part.

The parts run in order on the same machine in one process (the searches in child processes), results go to
``<out>/<date>.json`` and the report (``BENCHMARKS.md`` for the full run) is rendered from that file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import compression, edge, report, scaling, search_cost, serving, throughput, training
from benchmarks.common import FULL, REAL_DATA_DIR, SMOKE, Settings, header, open_bench
from pipelines.config import PROJECT_ROOT
from pipelines.steps.cli import run_cli

RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def run_benchmarks(settings: Settings, data_dir: Path, out_dir: Path, report_path: Path, work: Path | None = None) -> dict:
    """Run every part and write ``<out_dir>/<date>.json`` plus the rendered report; returns the results."""
    from pipelines.steps.teacher import train_teacher
    from registry.promote import promote

    started = time.perf_counter()
    keep = work is not None
    work = work or Path(tempfile.mkdtemp(prefix="kd-bench-"))
    try:
        bench = open_bench(settings, work, data_dir)
        results: dict = header(settings, bench.cfg)
        results["data"] = {
            "images": int(len(bench.prepared.dataset.labels)),
            "holdout": int(len(bench.prepared.splits.test)),
            "source": bench.prepared.dataset.source,
            "classes": bench.prepared.dataset.class_names,
            "digest": bench.prepared.dataset.digest[:12],
        }
        print(f"bench ({settings.mode}): {results['data']['images']} images at {settings.image_size} px; work folder {work}")
        step = time.perf_counter()
        bench.teacher_run_id = train_teacher(bench.cfg, bench.prepared)
        results["pipeline"] = {"teacher_s": time.perf_counter() - step}

        results["throughput"] = throughput.run(bench)
        results["search"] = search_cost.run(bench)
        step = time.perf_counter()
        bench.version = promote(bench.cfg).version
        results["pipeline"]["promote_s"] = time.perf_counter() - step
        results["compression"] = compression.run(bench)
        results["edge"] = edge.run(bench)
        results["serving"] = serving.run(bench)
        results["scaling"] = scaling.run(bench, results["search"]["ours"]["peak_rss_mib"])
        chain = {**{k: results["pipeline"][k] for k in ("teacher_s", "promote_s")}, **training.teacher_scores(bench.teacher_run_id)}
        results["training"] = training.run(
            bench, {**chain, "search_s": results["search"]["ours"]["wall_s"], "search": results["search"]["ours"]}
        )
        results["total_s"] = time.perf_counter() - started
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{results['date']}.json"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=False))
    report.render(results, json_path, report_path)
    met = [t for part in report.PARTS for t in results[part]["targets"]]
    print(
        f"bench: {sum(t['met'] for t in met)}/{len(met)} targets met in {results['total_s'] / 60:.1f} min; wrote {json_path} and "
        f"{report_path}"
    )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Measure KD throughput, search cost, compression, edge export, serving and scaling side by side."
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny data and settings (about 2 minutes): checks the benchmark code, not the figures"
    )
    parser.add_argument(
        "--data_dir", "--data-dir", type=Path, default=REAL_DATA_DIR, help="the real brain-mri-yes-no folder (yes/ and no/)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder; default benchmarks/results (smoke: benchmarks/results/smoke)"
    )
    parser.add_argument("--report", type=Path, default=None, help="report path; default BENCHMARKS.md (smoke: <out>/BENCHMARKS.md)")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the stores and models in this folder; default a temporary one, removed at the end"
    )

    def run(args: argparse.Namespace) -> dict:
        settings = SMOKE if args.smoke else FULL
        out = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
        return run_benchmarks(
            settings,
            args.data_dir,
            out,
            args.report or (out / "BENCHMARKS.md" if args.smoke else PROJECT_ROOT / "BENCHMARKS.md"),
            args.work,
        )

    run_cli(run, parser, argv)


if __name__ == "__main__":
    main()
