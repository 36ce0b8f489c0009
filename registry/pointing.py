"""The pointing game on real tumour scans with annotated boxes: does the Grad-CAM map of the student (and of its
teacher) peak inside the tumour's box, grown by ``TOLERANCE_PX`` (the usual 15 px)? Beside them, on the same scans, two
baselines that look at no model: the image centre, and the brightest pixel of the scan smoothed by a Gaussian; a map
that cannot beat them explains nothing a one-line heuristic would not.

Boxes are YOLO text files beside the scans (``y0.jpg`` + ``y0.txt``: ``class x_centre y_centre width height``, the last
four as fractions of the image's width and height). The class explained is the tumour class: the positive class of a
two-class model, else the most probable class that is not a "no tumour" class (``pipelines.data.sources.NEGATIVE_NAMES``).

Promote logs ``pointing_game_student``, ``pointing_game_teacher``, ``pointing_game_centre`` and
``pointing_game_brightest`` (fractions in [0, 1]), ``pointing_game_scans`` and param ``boxes_dir`` when ``boxes_dir``
is given; ``kd explain --boxes_dir`` measures a registered version and logs the same to its promote run.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from pipelines.config import PipelineError
from pipelines.data.images import decode_image
from pipelines.data.sources import IMAGE_EXTENSIONS, NEGATIVE_NAMES
from pipelines.log import logger
from pipelines.names import Metric

TOLERANCE_PX = 15
# The brightest-pixel baseline smooths the scan by a Gaussian of this fraction of its larger side (a 256 px scan:
# sigma 5 px), so that one hot pixel (noise, a marker) does not win over a bright region.
SMOOTHING = 0.02
BASELINES = ("centre", "brightest")
POINTING_ARTIFACT = "evaluation/pointing_game.csv"


@dataclass(frozen=True)
class BoxedScan:
    path: Path
    box: tuple[float, float, float, float]  # x_centre, y_centre, width, height: fractions of the image's width and height


def read_boxes(folder: Path | str) -> list[BoxedScan]:
    """Every scan of ``folder`` that has a box file beside it, in name order; malformed box files are refused by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"boxes_dir={str(folder)!r} is not a folder; give a folder of scans with their YOLO box files")
    scans = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.with_suffix(".txt").is_file()):
        text = path.with_suffix(".txt").read_text().split()
        try:
            box = tuple(float(value) for value in text[1:5])
        except ValueError:
            box = ()
        if len(text) < 5 or len(box) != 4 or not all(0.0 <= value <= 1.0 for value in box):
            raise PipelineError(
                f"{path.with_suffix('.txt')}: expected one line 'class x_centre y_centre width height' with fractions in [0, 1] (YOLO)"
            )
        scans.append(BoxedScan(path, box))
    if not scans:
        raise PipelineError(f"boxes_dir={str(folder)!r} holds no scan with a box file beside it (scan.jpg + scan.txt)")
    return scans


def in_box(point: tuple[float, float], box: tuple[float, float, float, float], shape: tuple[int, int], tolerance: float) -> bool:
    """Whether ``point`` (row, column) lies in the box (fractions) on an image of ``shape``, grown by ``tolerance`` px a side."""
    height, width = shape
    x_centre, y_centre, box_width, box_height = box
    row, column = point
    return (
        abs(column - x_centre * width) <= box_width * width / 2 + tolerance
        and abs(row - y_centre * height) <= box_height * height / 2 + tolerance
    )


def peak(values: np.ndarray) -> tuple[int, int]:
    """(row, column) of the largest value."""
    return tuple(int(i) for i in np.unravel_index(np.argmax(values), values.shape))


def brightest_point(scan: np.ndarray) -> tuple[int, int]:
    """The brightest pixel of the scan smoothed by a Gaussian of ``SMOOTHING`` times its larger side."""
    return peak(gaussian_filter(scan.astype(np.float64), sigma=SMOOTHING * max(scan.shape)))


def tumour_class(class_names: list[str], probabilities: dict[str, float]) -> str:
    """The class a tumour scan's map is computed for: the positive class of two, else the most probable tumour class."""
    if len(class_names) == 2:
        return class_names[1]
    tumours = [name for name in class_names if name.lower() not in NEGATIVE_NAMES]
    return max(tumours, key=lambda name: probabilities[name])


def pointing_game(models: dict, class_names: list[str], scans: list[BoxedScan], modality: int | None = None) -> pd.DataFrame:
    """One row per scan: for each model in ``models`` (name -> Keras model) and baseline, whether its point lies in the
    box grown by ``TOLERANCE_PX`` (``hit_<who>``), the class explained and the predicted one."""
    from tqdm.auto import tqdm

    from registry.explain import explain_scan

    rows = []
    for scan_entry in tqdm(scans, desc="pointing game", unit="scan", mininterval=1.0):
        scan = decode_image(scan_entry.path, modality)
        row = {"path": str(scan_entry.path)}
        points = {"centre": ((scan.shape[0] - 1) / 2, (scan.shape[1] - 1) / 2), "brightest": brightest_point(scan)}
        for who, model in models.items():
            # Two classes: the positive one, known before any forward pass; more: the likeliest tumour class, after one.
            explanation = explain_scan(model, scan, class_names, class_names[1] if len(class_names) == 2 else None)
            wanted = tumour_class(class_names, explanation.probabilities)
            if explanation.class_name != wanted:
                explanation = explain_scan(model, scan, class_names, wanted)
            row.update({f"class_{who}": wanted, f"predicted_{who}": explanation.predicted, f"empty_{who}": explanation.empty})
            # An empty map points nowhere: a miss, not the arg-max of zeros (the top-left corner).
            points[who] = None if explanation.empty else peak(explanation.heatmap)
        for who, point in points.items():
            row[f"hit_{who}"] = point is not None and in_box(point, scan_entry.box, scan.shape, TOLERANCE_PX)
        rows.append(row)
    return pd.DataFrame(rows)


def fractions(table: pd.DataFrame) -> dict[str, float]:
    """``pointing_game_<who>``: the fraction of scans each model and baseline hit, and ``pointing_game_scans``."""
    hits = {column.removeprefix("hit_"): float(table[column].mean()) for column in table.columns if column.startswith("hit_")}
    return {
        **{f"{Metric.POINTING_GAME_PREFIX}{who}": value for who, value in hits.items()},
        f"{Metric.POINTING_GAME_PREFIX}scans": len(table),
    }


def log_pointing_game(
    boxes_dir: str, models: dict, class_names: list[str], modality: int | None = None, run_id: str | None = None
) -> dict[str, float]:
    """Play the game on ``boxes_dir`` and log the fractions, ``boxes_dir`` and the per-scan table to the active run (or
    ``run_id``, e.g. a finished promote run); returns the fractions."""
    table = pointing_game(models, class_names, read_boxes(boxes_dir), modality)
    result = fractions(table)
    client = mlflow.MlflowClient()
    run_id = run_id or mlflow.active_run().info.run_id
    for key, value in result.items():
        client.log_metric(run_id, key, value)
    if client.get_run(run_id).data.params.get("boxes_dir", str(boxes_dir)) == str(boxes_dir):  # a param is written once
        client.log_param(run_id, "boxes_dir", str(boxes_dir))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(POINTING_ARTIFACT).name
        table.to_csv(path, index=False)
        client.log_artifact(run_id, str(path), str(Path(POINTING_ARTIFACT).parent))
    logger().info(
        f"pointing game on {len(table)} scans of {boxes_dir} (peak in the box + {TOLERANCE_PX} px): "
        + ", ".join(
            f"{key.removeprefix(Metric.POINTING_GAME_PREFIX)} {value:.3f}" for key, value in result.items() if not key.endswith("scans")
        )
    )
    return result


def explain_boxes(model_name: str, boxes_dir: str, stage: str | None = None, alias: str | None = None) -> dict[str, float]:
    """``kd explain --boxes_dir``: the pointing game of a registered version's student and teacher (the first member of
    an ensemble), logged to the version's promote run."""
    from registry.explain import load_models
    from registry.fetch import resolve_version

    read_boxes(boxes_dir)  # a bad folder is refused before the models load
    version = resolve_version(model_name, stage, alias)
    models = load_models(model_name, version)
    chosen = {"student": models.student, "teacher": next(iter(models.teachers.values()))}
    return log_pointing_game(boxes_dir, chosen, models.class_names, models.modality, run_id=version.run_id)
