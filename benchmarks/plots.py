"""The figures of BENCHMARKS.md: scaling, throughput bars and serving latency, drawn from a results file."""

from __future__ import annotations

from pathlib import Path

from benchmarks.tables import COST_LABELS, fmt
from pipelines.evaluation.metrics import pyplot, save_figure


def plot_scaling(scaling: dict, path: Path) -> Path:
    plt = pyplot()
    from matplotlib.ticker import NullLocator

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (
        (axes[0], scaling["by_images"], "images", "images (x1, x2, x4 by augmentation)", lambda p: f"{fmt(p['images'])}"),
        (axes[1], scaling["by_size"], "pixels", "pixels per image (image size)", lambda p: f"{fmt(p['image_size'])} px"),
    )
    for ax, points, x_key, x_label, tick in panels:
        for cost, label in COST_LABELS.items():
            ax.plot([p[x_key] for p in points], [p[cost] for p in points], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([p[x_key] for p in points], [tick(p) for p in points])  # the measured points, not log-decade ticks
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(x_label)
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Cost vs data size and image size (log-log)")
    return save_figure(figure, path, dpi=100)


def plot_bars(values: dict[str, float], ylabel: str, title: str, path: Path) -> Path:
    plt = pyplot()

    figure, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(values), list(values.values()), color="tab:blue")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return save_figure(figure, path, dpi=100)


def plot_serving(serving: dict, path: Path) -> Path:
    plt = pyplot()

    clients = [int(n) for n in serving["clients"]]
    levels = list(serving["clients"].values())
    figure, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(clients, [lv["p50_ms"] for lv in levels], marker="o", label="p50")
    ax.plot(clients, [lv["p95_ms"] for lv in levels], marker="o", label="p95")
    ax.axhline(serving["in_process_one_image"]["p50_ms"], color="grey", linestyle="--", label="in-process p50")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("latency (ms)")
    twin = ax.twinx()
    twin.plot(clients, [lv["requests_per_s"] for lv in levels], marker="s", color="tab:green", label="requests/s")
    twin.set_ylabel("requests/s")
    ax.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    return save_figure(figure, path, dpi=100)
