"""Part 6: how cost grows with the number of images (x1, x2, x4 by augmentation) and the image size.

Measured per point: one teacher training epoch, one student KD epoch with cached logits (the unit a trial is
made of: a trial is folds x epochs of them) and student inference over every image (batch 64). Each epoch is
the second of two, so graph tracing is not timed. Slopes are least-squares fits in log-log space (1 = linear).
Peak memory of a search comes from part 2 (the ``ours`` search process).
"""

from __future__ import annotations

import time

import keras
import numpy as np
from tqdm import tqdm

from benchmarks.common import Bench, EpochTimer, target
from pipelines.distiller import Distiller
from pipelines.models import build_student, build_teacher
from pipelines.prepare import prepare_data
from pipelines.teacher import load_teacher_logits
from pipelines.training import augmentation, make_dataset, predict_logits, set_seed

MEMORY_LIMIT_MIB = 4096


def grown(images: np.ndarray, labels: np.ndarray, logits: np.ndarray, factor: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The set and ``factor - 1`` augmented copies of it (each copy keeps its original's label and teacher logits)."""
    copies = [images] + [np.asarray(augmentation(seed + k)(images, training=True)) for k in range(1, factor)]
    return np.concatenate(copies), np.tile(labels, factor), np.tile(logits, (factor, 1))


def epoch_seconds(trainer: Distiller, images: np.ndarray, labels: np.ndarray, logits: np.ndarray | None, batch_size: int, seed: int) -> float:
    """Seconds of the second of two epochs: the first traces the train step for every batch shape, the second reuses it."""
    timer = EpochTimer()
    trainer.fit(make_dataset(images, labels, None, logits, batch_size, shuffle=True, seed=seed), epochs=2, verbose=0, callbacks=[timer], shuffle=False)
    return timer.seconds[1]


def measure(bench: Bench, images: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    cfg, num_classes, binary = bench.cfg, bench.prepared.dataset.num_classes, bench.prepared.dataset.binary
    size = images.shape[1]
    set_seed(cfg.seed)
    teacher = Distiller(build_teacher(cfg.teacher_arch, size, num_classes, seed=cfg.seed), None, 1.0, 1.0, binary)
    teacher.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
    student = Distiller(build_student(cfg.student_size, size, num_classes, seed=cfg.seed), None, cfg.temperature, cfg.alpha, binary)
    student.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
    result = {
        "images": float(len(images)), "image_size": float(size),
        "teacher_epoch_s": epoch_seconds(teacher, images, labels, None, cfg.batch_size, cfg.seed),
        "student_kd_epoch_s": epoch_seconds(student, images, labels, logits, cfg.batch_size, cfg.seed),
    }
    predict_logits(student.student, images[:64])  # traces the predict step
    start = time.perf_counter()
    predict_logits(student.student, images)
    result["student_inference_s"] = time.perf_counter() - start
    return result


def slope(x: list[float], y: list[float]) -> float:
    """Exponent b of y ~ x^b, least squares on logs; NaN with fewer than two distinct points."""
    if len(set(x)) < 2:
        return float("nan")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


COSTS = ("teacher_epoch_s", "student_kd_epoch_s", "student_inference_s")


def run(bench: Bench, search_peak_rss_mib: float | None) -> dict:
    prepared, cfg, settings = bench.prepared, bench.cfg, bench.settings
    labels = prepared.dataset.labels
    logits = load_teacher_logits(bench.teacher_run_id, prepared.dataset.manifest["sha256"].to_numpy())["all"]
    # The x1 point at the base size lies on both axes: measured once.
    points = {(f, cfg.image_size) for f in settings.scale_factors} | {(1, s) for s in settings.scale_sizes}
    measured = {}
    for factor, size in tqdm(sorted(points), desc="part 6: scaling", unit="point"):
        images = prepared.images if size == cfg.image_size else prepare_data(cfg.replace(image_size=size)).images
        measured[factor, size] = measure(bench, *grown(images, labels, logits, factor, cfg.seed))
    by_images = [{"factor": float(f), **measured[f, cfg.image_size]} for f in settings.scale_factors]
    by_size = [{"pixels": float(s * s), **measured[1, s]} for s in settings.scale_sizes]
    slopes = {
        "vs_images": {cost: slope([p["images"] for p in by_images], [p[cost] for p in by_images]) for cost in COSTS},
        "vs_pixels": {cost: slope([p["pixels"] for p in by_size], [p[cost] for p in by_size]) for cost in COSTS},
    }
    result = {
        "by_images": by_images, "by_size": by_size, "loglog_slopes": slopes, "search_peak_rss_mib": search_peak_rss_mib,
        "setup": {"augmentation": "pipelines.training.augmentation (flip, rotation, zoom, shift, contrast)", "batch_size": cfg.batch_size,
                  "base_images": int(len(labels)), "memory": "peak RSS (VmHWM) of the part-2 'ours' search process"},
        "targets": [] if search_peak_rss_mib is None else [target(f"peak RSS of a search < {MEMORY_LIMIT_MIB} MiB", search_peak_rss_mib, MEMORY_LIMIT_MIB, at_least=False)],
    }
    print(f"part 6: log-log slopes vs images {slopes['vs_images']}, vs pixels {slopes['vs_pixels']}; search peak RSS {search_peak_rss_mib} MiB")
    return result
