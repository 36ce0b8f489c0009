"""Part 6: how cost grows with the number of images (x1, x2, x4 by augmentation) and the image size.

Measured per point: one teacher training epoch, one student KD epoch with cached logits (the unit a trial is
made of: a trial is folds x epochs of them) and student inference over every image (batch 64). Each epoch is
the second of two, so graph tracing is not timed. Slopes are least-squares fits in log-log space (1 = linear).
Peak memory of a search comes from part 2 (the ``ours`` search process).

Before/after, in the same run: the teacher and student epochs at the base point trained in float32 and in
bfloat16 (``Config.precision``, measured alternately so load on the machine hits both), and the input pipeline
(``make_dataset``) against the one it replaced (a ``.cache()`` and a float32 copy on top of the in-memory slices)
at the largest image count: slicing speed and the peak memory of a fresh process that builds and reads it.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from benchmarks.common import Bench, EpochTimer, ratio, target
from pipelines.evaluation.metrics import model_logits
from pipelines.models.builders import build_student, build_teacher
from pipelines.models.distiller import Distiller
from pipelines.steps.prepare import prepare_data
from pipelines.steps.teacher import load_teacher_logits
from pipelines.training.fit import make_dataset, set_seed, training_precision
from pipelines.training.views import views_of

MEMORY_LIMIT_MIB = 4096


def grown(images: np.ndarray, labels: np.ndarray, logits: np.ndarray, factor: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The set and ``factor - 1`` augmented copies of it (each copy keeps its original's label and teacher logits)."""
    keys = np.arange(len(images), dtype=np.int64) + seed
    copies = [images] + [views_of(images, keys, view) for view in range(1, factor)]
    return np.concatenate(copies), np.tile(labels, factor), np.tile(logits, (factor, 1))


def epoch_seconds(
    trainer: Distiller, images: np.ndarray, labels: np.ndarray, logits: np.ndarray | None, batch_size: int, seed: int
) -> float:
    """Seconds of the second of two epochs: the first traces the train step for every batch shape, the second reuses it."""
    timer = EpochTimer()
    trainer.fit(
        make_dataset(images, labels, None, logits, batch_size, shuffle=True, seed=seed),
        epochs=2,
        verbose=0,
        callbacks=[timer],
        shuffle=False,
    )
    return timer.seconds[1]


def trainers(bench: Bench, size: int, precision: str) -> tuple[Distiller, Distiller]:
    """A fresh teacher and KD student, built and compiled under ``precision`` (fit them in it too)."""
    cfg, num_classes, binary = bench.cfg, bench.prepared.dataset.num_classes, bench.prepared.dataset.binary
    set_seed(cfg.seed)
    with training_precision(precision):
        teacher = Distiller(build_teacher(cfg.teacher_arch, size, num_classes, seed=cfg.seed), None, 1.0, 1.0, binary)
        teacher.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
        student = Distiller(build_student(cfg.student_size, size, num_classes, seed=cfg.seed), None, cfg.temperature, cfg.alpha, binary)
        student.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
    return teacher, student


def measure(bench: Bench, images: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    cfg, size = bench.cfg, images.shape[1]
    teacher, student = trainers(bench, size, "float32")
    result = {
        "images": float(len(images)),
        "image_size": float(size),
        "teacher_epoch_s": epoch_seconds(teacher, images, labels, None, cfg.batch_size, cfg.seed),
        "student_kd_epoch_s": epoch_seconds(student, images, labels, logits, cfg.batch_size, cfg.seed),
    }
    model_logits(student.student, images[:64])  # traces the predict step
    start = time.perf_counter()
    model_logits(student.student, images)
    result["student_inference_s"] = time.perf_counter() - start
    return result


def precision_epochs(bench: Bench, images: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> dict:
    """Teacher and student KD epoch seconds in float32 and bfloat16, alternating; ratio = float32 s / bfloat16 s
    (above 1: bfloat16 trains faster; CPUs without AVX-512 BF16 or AMX emulate it and come out below 1)."""
    cfg, size = bench.cfg, images.shape[1]
    seconds: dict[str, dict[str, float]] = {"float32": {}, "bfloat16": {}}
    built = {precision: trainers(bench, size, precision) for precision in seconds}
    for name, cached_logits, index in (("teacher_epoch_s", None, 0), ("student_kd_epoch_s", logits, 1)):
        for precision in seconds:
            seconds[precision][name] = epoch_seconds(built[precision][index], images, labels, cached_logits, cfg.batch_size, cfg.seed)
    speedup = {name: ratio(seconds["float32"][name], seconds["bfloat16"][name]) for name in seconds["float32"]}
    return {**seconds, "float32_over_bfloat16": speedup}


def _old_pipeline(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    """The input pipeline make_dataset replaced, kept here as the baseline: a float32 copy and a .cache() on top."""
    dataset = tf.data.Dataset.from_tensor_slices(({"image": images.astype(np.float32)}, labels.astype(np.int32))).cache()
    return dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _pipeline_child(variant: str, arrays: str, batch_size: int, seed: int, results) -> None:
    """In a fresh process: load the set, build the pipeline, read it twice; report the second pass's images/s and
    the growth of peak memory (VmHWM) over the process with the set loaded."""
    with np.load(arrays) as stored:
        images, labels = stored["images"], stored["labels"]
    before = _peak_rss_mib()
    build = _old_pipeline if variant == "before" else lambda *a: make_dataset(*a[:2], batch_size=a[2], shuffle=True, seed=a[3])
    dataset = build(images, labels, batch_size, seed)
    for _ in dataset:
        pass
    start = time.perf_counter()
    for _ in dataset:
        pass
    results.put((variant, {"images_per_s": len(labels) / (time.perf_counter() - start), "peak_rss_growth_mib": _peak_rss_mib() - before}))


def _peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def pipeline_before_after(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int) -> dict:
    """The old and the new input pipeline, each in its own spawned process; ratios before / after."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        arrays = str(Path(tmp) / "set.npz")
        np.savez(arrays, images=images, labels=labels)
        for variant in ("before", "after"):
            child = context.Process(target=_pipeline_child, args=(variant, arrays, batch_size, seed, results))
            child.start()
            name, values = results.get(timeout=600)
            child.join()
            measured[name] = values
    return {
        **measured,
        "images": float(len(labels)),
        "image_mib": images.nbytes / 2**20,
        "before_over_after": {key: ratio(measured["before"][key], measured["after"][key]) for key in measured["after"]},
    }


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
    largest = max(settings.scale_factors)
    base = grown(prepared.images, labels, logits, 1, cfg.seed)
    precision = precision_epochs(bench, *base)
    pipeline = pipeline_before_after(*grown(prepared.images, labels, logits, largest, cfg.seed)[:2], cfg.batch_size, cfg.seed)
    slopes = {
        "vs_images": {cost: slope([p["images"] for p in by_images], [p[cost] for p in by_images]) for cost in COSTS},
        "vs_pixels": {cost: slope([p["pixels"] for p in by_size], [p[cost] for p in by_size]) for cost in COSTS},
    }
    result = {
        "by_images": by_images,
        "by_size": by_size,
        "loglog_slopes": slopes,
        "search_peak_rss_mib": search_peak_rss_mib,
        "precision": precision,
        "input_pipeline": pipeline,
        "setup": {
            "augmentation": "pipelines.training.fit.augmentation (flip, rotation, zoom, shift, contrast)",
            "batch_size": cfg.batch_size,
            "base_images": int(len(labels)),
            "memory": "peak RSS (VmHWM) of the part-2 'ours' search process",
            "precision": f"base point ({len(labels)} images, {cfg.image_size} px), second of two epochs, float32 and bfloat16 alternating",
            "input_pipeline": (
                f"x{largest} point; before = from_tensor_slices + float32 copy + .cache(), after = make_dataset; one spawned process each"
            ),
        },
        "targets": []
        if search_peak_rss_mib is None
        else [target(f"peak RSS of a search < {MEMORY_LIMIT_MIB} MiB", search_peak_rss_mib, MEMORY_LIMIT_MIB, at_least=False)],
    }
    print(
        f"part 6: log-log slopes vs images {slopes['vs_images']}, vs pixels {slopes['vs_pixels']}; search peak RSS {search_peak_rss_mib} "
        "MiB; "
        f"float32 / bfloat16 epoch s {precision['float32_over_bfloat16']}; input pipeline before / after {pipeline['before_over_after']}"
    )
    return result
