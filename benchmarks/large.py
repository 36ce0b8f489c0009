"""A larger data set made from a small one, and the wall time of each step of a ``main`` run on it.

``python -m benchmarks.large grow --source ../shared/data/brain-mri-yes-no --out /tmp/mri-3000 --images 3000``
writes augmented copies of every scan (flips, small rotations, zoom, contrast and brightness jitter) as PNGs
plus ``manifest.csv`` whose ``group`` is the original scan, so copies of one scan never straddle the hold-out
split or two folds. ``python -m benchmarks.large steps --tracking-uri sqlite:///mlflow.db [--run-id ID]`` prints
the wall time of each step of a finished ``main`` run (the newest one by default), read from the tracking store.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from pipelines.data.sources import IMAGE_EXTENSIONS
from pipelines.steps.cli import run_cli


def augmented(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One random variant of a scan, as a scanner or a patient's position might change it."""
    image = image.convert("L")
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = image.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
    zoom = float(rng.uniform(0.9, 1.1))
    image = image.resize((max(32, round(image.width * zoom)), max(32, round(image.height * zoom))), Image.Resampling.BILINEAR)
    image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.8, 1.2)))
    return ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.85, 1.15)))


def grow(source: Path, out: Path, images: int, seed: int = 0) -> Path:
    """Write ``images`` scans (the originals first, then augmented copies in turn) and a grouped manifest."""
    originals = sorted((p, p.parent.name) for p in Path(source).glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not originals:
        raise SystemExit(f"{source}: no class folders with images")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(images):
        path, label = originals[index % len(originals)]
        copy = index // len(originals)
        (out / label).mkdir(exist_ok=True)
        name = f"{label}/{path.name.replace('.', '_')}_{copy:03d}.png"  # Y92.jpg and Y92.png are two scans
        with Image.open(path) as image:
            (image.convert("L") if copy == 0 else augmented(image, rng)).save(out / name)
        rows.append([name, label, f"{label}/{path.name}"])
    with open(out / "manifest.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "group"], *rows])
    print(f"grow: {images} images from {len(originals)} originals in {out}/manifest.csv")
    return out / "manifest.csv"


def step_times(tracking_uri: str, run_id: str = "") -> dict[str, float]:
    """Seconds from start to end of the ``main`` run and each step it chained (``kd.<step>_run_id`` tags)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if not run_id:
        found = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            "tags.`kd.step` = 'main' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not found:
            raise SystemExit(f"no finished main run in {tracking_uri}")
        run_id = found[0].info.run_id
    main = client.get_run(run_id)
    runs = {"main": main} | {
        key[3:-7]: client.get_run(value) for key, value in main.data.tags.items() if key.startswith("kd.") and key.endswith("_run_id")
    }
    times = {step: (run.info.end_time - run.info.start_time) / 1000 for step, run in runs.items()}
    times["main"] = (max(run.info.end_time for run in runs.values()) - main.info.start_time) / 1000
    for step, seconds in times.items():
        print(f"  {step:<8} {seconds / 60:7.1f} min")
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Grow a data set by augmentation; time the steps of a main run.")
    commands = parser.add_subparsers(dest="command", required=True)
    grow_parser = commands.add_parser("grow", help="write an augmented, grouped copy of a folder-per-class set")
    grow_parser.add_argument("--source", type=Path, required=True)
    grow_parser.add_argument("--out", type=Path, required=True)
    grow_parser.add_argument("--images", type=int, required=True)
    grow_parser.add_argument("--seed", type=int, default=0)
    steps_parser = commands.add_parser("steps", help="wall time of each step of a finished main run")
    steps_parser.add_argument("--tracking-uri", required=True)
    steps_parser.add_argument("--run-id", default="")
    run_cli(
        lambda a: grow(a.source, a.out, a.images, a.seed) if a.command == "grow" else step_times(a.tracking_uri, a.run_id), parser, argv
    )


if __name__ == "__main__":
    main()
