"""Render BENCHMARKS.md and its plots from a results JSON: every figure comes from the file, none is typed.

``python -m benchmarks.report benchmarks/results/<date>.json [--report BENCHMARKS.md]`` re-renders a saved run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.plots import plot_bars, plot_scaling, plot_serving
from benchmarks.tables import COST_LABELS, fmt, interval, table
from registry.report.document import data_label

PARTS = ("throughput", "search", "compression", "edge", "serving", "scaling", "training")
TITLES = {
    "throughput": "1. KD training throughput (cached logits vs online teacher)",
    "search": "2. Search cost (naive vs ours)",
    "compression": "3. Compression (teacher vs promoted student, hold-out split)",
    "edge": "4. Edge export (TFLite float32 and INT8)",
    "serving": "5. Serving (`mlflow models serve`, loopback)",
    "scaling": "6. Scaling and memory",
    "training": "7. Training speed (today's settings vs each lever vs all, real 4-class scans)",
}


def figures(tree, prefix: str = "") -> list[tuple[str, float]]:
    """Every measured number of a part as (dotted key, value); targets and settings are rendered elsewhere."""
    found = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key not in ("targets", "setup"):
                found += figures(value, f"{prefix}{key}.")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += figures(value, f"{prefix}{index}.")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        found.append((prefix.rstrip("."), float(tree)))
    return found


def training_tables(r: dict) -> list[str]:
    """Part 7: every variant's images/s, its speed-up over today's at the same role and size, its fold F1; the main chain."""

    def mean_sd(mean: float, sd: float) -> str:
        return f"{fmt(mean)} ± {fmt(sd)}"

    rows = [
        [
            role,
            name,
            v["images_per_s"],
            v["images_per_s"] / r[role][f"{name.split()[0]} today"]["images_per_s"],
            mean_sd(v["f1_mean"], v["f1_std"]),
            v["wall_s"],
        ]
        for role in ("teacher", "student")
        for name, v in r[role].items()
    ]
    main = r["main"]

    def chain(c: dict, per_1000_s: float) -> list:
        teacher_f1, best_f1 = mean_sd(c["teacher_f1"], c["teacher_f1_std"]), mean_sd(c["search"]["best_f1"], c["search"]["best_f1_std"])
        return [c["teacher_s"], c["search_s"], c["promote_s"], teacher_f1, best_f1, per_1000_s / 60]

    return [
        table(["role", "size and variant", "images/s", "x today", "fold F1 (mean ± sd)", "wall s"], rows),
        f"Levers: today {r['setup']['today']}; each alone {r['setup']['levers']}; fast (FAST_TRAINING: the levers that "
        f"measured faster, over today's) {r['setup']['fast']}. Fold F1 after {r['setup']['epochs']} epoch(s) of every variant: "
        f"equal epochs, not equal optimiser steps (a batch of {r['setup']['fast']['batch_size']} takes "
        f"{r['setup']['today']['batch_size']}/{r['setup']['fast']['batch_size']} of the steps of a batch of "
        f"{r['setup']['today']['batch_size']}), so it "
        "checks that a variant trains, not how good its model gets; the main chain below compares the models of both "
        "settings after early stopping.",
        table(
            [
                "main chain (bench data)",
                "teacher s",
                "search s",
                "promotion s",
                "teacher k-fold F1",
                "best trial k-fold F1",
                "per 1,000 images, min",
            ],
            [
                ["today's settings (the bench's own chain)", *chain(main["today"], main["today_per_1000_s"])],
                ["fast (FAST_TRAINING)", *chain(main["fast"], main["fast_per_1000_s"])],
            ],
        ),
    ]


def part_tables(part: str, r: dict) -> list[str]:
    """The readable tables of one part (the complete figure list follows them)."""
    if part == "training":
        return training_tables(r)
    if part == "throughput":
        rows = [[name, value, r["first_epoch_s"][name]] for name, value in r["images_per_s"].items()]
        return [
            table(["variant", "images/s (timed epochs)", "first epoch s (tracing, XLA compile)"], rows),
            f"cached / online: **{fmt(r['cached_vs_online'])}x**; XLA on cached: x{fmt(r['xla_gain_cached'])}; best cached variant / "
            f"online: {fmt(r['best_cached_vs_online'])}x",
        ]
    if part == "search":
        rows = [
            [
                s,
                r[s]["wall_s"],
                r[s]["best_f1"],
                r[s]["best_f1_std"],
                r[s]["trials"],
                r[s]["pruned"],
                r[s]["folds_trained"],
                r[s]["peak_rss_mib"],
            ]
            for s in ("naive", "ours")
        ]
        return [
            table(["strategy", "wall s", "best F1", "F1 std", "trials", "pruned", "folds trained", "peak RSS MiB"], rows),
            f"naive / ours wall time: **{fmt(r['naive_vs_ours_wall'])}x**; best-F1 gap {fmt(r['best_f1_gap'])}",
        ]
    if part == "compression":
        keys = ("params", "file_bytes", "flops", "batch1_p50_ms", "batch1_p95_ms", "batch32_p50_ms", "batch32_p95_ms", "f1", "roc_auc")
        rows = [[key, r["teacher"][key], r["student"][key], r["teacher_over_student"].get(key, "")] for key in keys]
        blocks = [
            table(["", "teacher", "student", "teacher / student"], rows),
            f"FLOPs: {r['setup']['flops_method']}. F1 drop (teacher - student): {fmt(r['f1_drop'])}",
        ]
        if "scans_f1_drop" in r:  # results from before the F1 scans render without them
            blocks.append(
                f"F1 teacher - student with its 95% paired bootstrap interval: on the hold-out split {interval(r['holdout_f1_drop'])}; "
                f"on the F1 scans **{interval(r['scans_f1_drop'])}** (F1 teacher {fmt(r['teacher']['scans_f1'])}, student "
                f"{fmt(r['student']['scans_f1'])}). The F1 scans: {r['setup']['f1_scans']}."
            )
        return blocks
    if part == "edge":
        ops = r.get("float_ops", {})
        rows = [
            [name, f["size_bytes"], f["p50_ms"], f["p95_ms"], f["f1"], f["roc_auc"], ops.get(name, "")] for name, f in r["formats"].items()
        ]
        if "float32_minus_int8_f1" not in r:  # results from before QAT existed: one INT8, its absolute gap
            summary = f"|F1 INT8 - float32| {fmt(r['int8_vs_float32_f1_gap'])}"
        else:
            summary = f"{r['setup']['served_int8']} / float32 batch-1 p50: **{fmt(r['float32_over_int8_batch1_p50'])}x**; " + "; ".join(
                f"F1 float32 - {name}: {fmt(gap)}" for name, gap in r["float32_minus_int8_f1"].items()
            )
        blocks = [
            table(["format", "bytes", "batch-1 p50 ms", "p95 ms", "hold-out F1", "ROC-AUC", "float ops in the graph"], rows),
            f"Keras / INT8 batch-1 p50: **{fmt(r['keras_over_int8_batch1_p50'])}x**; Keras / float32: "
            f"{fmt(r['keras_over_float32_batch1_p50'])}x; {summary}; logged to run `{r['logged_to_run']}`",
        ]
        batched = next((key for key in r if key.startswith("batch") and key.endswith("_p50_ms")), None)
        if batched:  # results from before the batch timing and the F1 scans render without them
            batch = batched.removeprefix("batch").removesuffix("_p50_ms")
            scans_f1, gaps, holdout = r["scans_f1"], r["scans_float32_minus_int8_f1"], r["holdout_float32_minus_int8_f1"]
            blocks += [
                table(
                    ["format", f"batch-{batch} p50 ms", "per image ms", "F1 on the F1 scans", "float32 - this F1, F1 scans (95%)"],
                    [
                        [name, ms, ms / int(batch), scans_f1[name], interval(gaps[name]) if name in gaps else ""]
                        for name, ms in r[batched].items()
                    ]
                    + [["keras", "", "", scans_f1["keras"], ""]],
                ),
                f"{r['setup']['served_int8']} / float32 at batch {batch}: **{fmt(r[f'float32_over_int8_batch{batch}_p50'])}x**; "
                "float32 - INT8 F1 on the hold-out split with its 95% paired bootstrap interval: "
                + "; ".join(f"{name} {interval(gap)}" for name, gap in holdout.items())
                + f". The F1 scans: {r['setup']['f1_scans']}.",
            ]
        return blocks
    if part == "serving":
        rows = [[n, lv["p50_ms"], lv["p95_ms"], lv["requests_per_s"], lv["requests"], lv["errors"]] for n, lv in r["clients"].items()]
        ip = r["in_process_one_image"]
        blocks = [
            table(["clients", "p50 ms", "p95 ms", "requests/s", "requests", "errors"], rows),
            f"in-process pyfunc, one image: p50 {fmt(ip['p50_ms'])} ms, p95 {fmt(ip['p95_ms'])} ms; served p50 at one client / in-process "
            f"p50: **{fmt(r['served_over_in_process_p50'])}x**",
        ]
        if "http_floor_ping" in r:  # results from before the HTTP floor was measured render without it
            blocks.append(
                f"HTTP floor (GET /ping, same server and client, one at a time): p50 {fmt(r['http_floor_ping']['p50_ms'])} ms, p95 "
                f"{fmt(r['http_floor_ping']['p95_ms'])} ms; (served p50 at one client - floor) / in-process p50: "
                f"**{fmt(r['served_above_floor_over_in_process_p50'])}x**"
            )
        return blocks
    if part == "scaling":
        rows = [["x" + fmt(p["factor"]), p["images"], p["image_size"]] + [p[c] for c in COST_LABELS] for p in r["by_images"]]
        rows += [[f"{fmt(p['image_size'])} px", p["images"], p["image_size"]] + [p[c] for c in COST_LABELS] for p in r["by_size"]]
        slopes = [[axis] + [r["loglog_slopes"][axis][c] for c in COST_LABELS] for axis in ("vs_images", "vs_pixels")]
        blocks = [
            table(["point", "images", "size px", *(f"{label} (s)" for label in COST_LABELS.values())], rows),
            "Log-log slopes (1 = linear):",
            table(["axis", *COST_LABELS.values()], slopes),
            f"Peak RSS of the search process (part 2, ours): **{fmt(r['search_peak_rss_mib'])} MiB**",
        ]
        if "precision" in r:  # results from before these measurements existed render without them
            p = r["precision"]
            blocks += [
                "Training precision, before (float32) and after (bfloat16), same run:",
                table(
                    ["epoch", "float32 s", "bfloat16 s", "float32 / bfloat16"],
                    [
                        [COST_LABELS[c], p["float32"][c], p["bfloat16"][c], p["float32_over_bfloat16"][c]]
                        for c in p["float32_over_bfloat16"]
                    ],
                ),
            ]
        if "input_pipeline" in r:
            q = r["input_pipeline"]
            blocks += [
                f"Input pipeline, before and after, {fmt(q['images'])} images ({fmt(q['image_mib'])} MiB of float32 pixels):",
                table(
                    ["", "before", "after", "before / after"],
                    [[key, q["before"][key], q["after"][key], q["before_over_after"][key]] for key in q["before_over_after"]],
                ),
            ]
        return blocks
    raise ValueError(part)


def main_per_1000_images(results: dict) -> float:
    """Seconds of the ``main`` chain (teacher, search, promotion) per 1,000 images at the run's settings."""
    steps = results["pipeline"]["teacher_s"] + results["search"]["ours"]["wall_s"] + results["pipeline"]["promote_s"]
    return steps * 1000 / results["data"]["images"]


def render(results: dict, json_path: Path, report_path: Path) -> list[Path]:
    """Write ``report_path`` and its PNG plots beside ``json_path``; returns the plot paths."""
    stem = json_path.with_suffix("")
    plots = {
        "scaling": plot_scaling(results["scaling"], Path(f"{stem}-scaling.png")),
        "throughput": plot_bars(
            results["throughput"]["images_per_s"], "images/s", "KD training throughput", Path(f"{stem}-throughput.png")
        ),
        "serving": plot_serving(results["serving"], Path(f"{stem}-serving.png")),
    }
    link = lambda path: os.path.relpath(path, report_path.parent)  # noqa: E731 (one-line helper)
    machine, settings = results["machine"], results["settings"]
    parts = [part for part in PARTS if part in results]  # a results file from before a part existed re-renders without it
    targets = [(part, t) for part in parts for t in results[part]["targets"]]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python -m benchmarks{' --smoke' if settings['mode'] == 'smoke' else ''}` from "
        f"[`{link(json_path)}`]({link(json_path)}) on {results['started_utc']}; "
        f"every figure below comes from that file (re-render: `python -m benchmarks.report {link(json_path)}`). Total run time "
        f"{fmt(results['total_s'] / 60)} min.",
        "",
        f"**Device:** {results.get('device') or ('GPU: ' + ', '.join(machine['gpus']) if machine['gpus'] else 'CPU only')}.  ",
        f"**Machine:** {machine['cpu']}, {machine['cpu_count']} cores, {fmt(machine['memory_gib'])} GiB RAM"
        + (f", GPUs {', '.join(machine['gpus'])}" if machine["gpus"] else "")
        + f", {machine['platform']}.  ",
        "**Versions:** "
        + ", ".join(f"{name} {version}" for name, version in {"python": machine["python"], **machine["packages"]}.items())
        + ".  ",
        f"**Data:** {results['data']['images']} images ({results['data']['source']}, classes {', '.join(results['data']['classes'])}, "
        f"digest {results['data']['digest']}), hold-out {results['data']['holdout']}.  ",
        f"**Settings ({settings['mode']}):** " + ", ".join(f"{k} {v}" for k, v in settings.items() if k != "mode") + ".  ",
        "**Config:** " + ", ".join(f"{k} {data_label(v) if k == 'data_dir' else v}" for k, v in results["config"].items()) + ".  ",
        f"**Pipeline:** teacher training {fmt(results['pipeline']['teacher_s'])} s, promotion {fmt(results['pipeline']['promote_s'])} s.  ",
        f"**Main per 1,000 images:** {fmt(main_per_1000_images(results) / 60)} min: teacher, search (ours) and promotion above at these "
        "settings, "
        f"scaled linearly from {results['data']['images']} images (part 6 measures how close to linear the cost grows).",
        "",
        "## Targets",
        "",
        table(
            ["part", "target", "measured", "threshold", "status"],
            [
                [
                    TITLES[part].split(" ", 1)[0].rstrip("."),
                    t["target"],
                    t["value"],
                    f"{t['comparison']} {fmt(t['threshold'])}",
                    "met" if t["met"] else "**not met**",
                ]
                for part, t in targets
            ],
        ),
        "",
    ]
    changed = [(part, t) for part, t in targets if t.get("why")]
    if changed:
        lines += ["Targets measured differently from their first definition, and why:", ""]
        lines += [f"- part {TITLES[part].split('.', 1)[0]}, *{t['target']}*: {t['why']}." for part, t in changed]
        lines.append("")
    for part in parts:
        section = results[part]
        lines += [f"## {TITLES[part]}", ""]
        for block in part_tables(part, section):
            lines += [block, ""]
        if part in plots:
            lines += [f"![{part}]({link(plots[part])})", ""]
        lines += ["Setup: " + "; ".join(f"{k}: {v}" for k, v in section["setup"].items()), ""]
        lines += [
            "<details><summary>All figures of this part</summary>",
            "",
            table(["figure", "value"], [[key, value] for key, value in figures(section)]),
            "",
            "</details>",
            "",
        ]
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text("\n".join(lines))
    return list(plots.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render BENCHMARKS.md from a benchmark results JSON.")
    parser.add_argument("results", type=Path)
    parser.add_argument("--report", type=Path, default=Path(__file__).resolve().parent.parent / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    render(json.loads(args.results.read_text()), args.results, args.report)
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
