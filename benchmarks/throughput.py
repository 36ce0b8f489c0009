"""Part 1: images/s of KD student training with the teacher online (forward pass every step) vs cached logits.

Same fold-0 teacher, student, rows, batch size, seed and epochs for every variant. XLA (``jit_compile``, off by
default on CPU in Keras) is measured on top of cached mode, the one the project trains with. The first epoch
traces (and, with XLA, compiles) the graph and is not timed; its time is reported separately.

An epoch is ``Settings.throughput_rows`` images: fold 0's training rows repeated up to that many (``WHY``).
"""

from __future__ import annotations

import keras
import numpy as np
from tqdm import tqdm

from benchmarks.common import Bench, EpochTimer, ratio, target
from pipelines.models.builders import build_student
from pipelines.models.distiller import Distiller
from pipelines.steps.teacher import load_teacher_logits, load_teacher_model
from pipelines.training.fit import class_weights, make_dataset, set_seed

VARIANTS = (("online", False), ("cached", False), ("cached", True))
WHY = (
    "timed on epochs of fold 0's training rows repeated up to that many images, no longer on those rows once ({rows}: "
    "{steps} steps of {batch}). An epoch's fixed cost (iterator start, callbacks, the short last batch) is the same with "
    "or without the teacher and was a large share of a 9-step cached epoch, so the ratio measured the tiny set's epoch "
    "overhead more than what caching saves per image trained; real training runs epochs of thousands of scans"
)


def epoch_rows(bench: Bench) -> int:
    """Images per timed epoch: ``throughput_rows``, or fold 0's training rows where there are more."""
    return max(bench.settings.throughput_rows, len(bench.prepared.splits.folds[0][0]))


def images_per_second(bench: Bench, mode: str, jit_compile: bool) -> tuple[float, float]:
    """Student KD training throughput on fold 0's training rows (median timed epoch), and the first (tracing) epoch's seconds."""
    cfg, prepared = bench.cfg, bench.prepared
    rows = np.resize(prepared.splits.folds[0][0], epoch_rows(bench))
    labels = prepared.dataset.labels
    weights = class_weights(labels[rows], prepared.dataset.num_classes)[labels[rows]]
    logits = (
        load_teacher_logits(bench.teacher_run_id, prepared.dataset.manifest["sha256"].to_numpy())["fold_0"][rows]
        if mode == "cached"
        else None
    )
    set_seed(cfg.seed)
    student = build_student(cfg.student_size, cfg.image_size, prepared.dataset.num_classes, seed=cfg.seed)
    teacher = load_teacher_model(bench.teacher_run_id, "fold_0") if mode == "online" else None
    trainer = Distiller(student, teacher, cfg.temperature, cfg.alpha, prepared.dataset.binary)
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), jit_compile=jit_compile)
    train = make_dataset(prepared.images[rows], labels[rows], weights, logits, cfg.batch_size, shuffle=True, seed=cfg.seed)
    timer = EpochTimer()
    epochs = bench.settings.throughput_epochs
    trainer.fit(train, epochs=1 + epochs, verbose=0, callbacks=[timer], shuffle=False)  # the dataset shuffles itself
    # The median epoch: a timed epoch can still retrace once (Keras relaxes the batch shape after two shapes,
    # and XLA then compiles the relaxed function again), which is tracing, not throughput.
    return len(rows) / float(np.median(timer.seconds[1:])), timer.seconds[0]


def run(bench: Bench) -> dict:
    measured, first_epoch_s = {}, {}
    for mode, jit in tqdm(VARIANTS, desc="part 1: KD throughput", unit="variant"):
        name = f"{mode}{'_xla' if jit else ''}"
        measured[name], first_epoch_s[name] = images_per_second(bench, mode, jit)
    speedup = ratio(measured["cached"], measured["online"])
    rows = len(bench.prepared.splits.folds[0][0])
    result = {
        "images_per_s": measured,
        "first_epoch_s": first_epoch_s,
        "cached_vs_online": speedup,
        "xla_gain_cached": ratio(measured["cached_xla"], measured["cached"]),
        "best_cached_vs_online": ratio(max(measured["cached"], measured["cached_xla"]), measured["online"]),
        "setup": {
            "image_size": bench.cfg.image_size,
            "batch_size": bench.cfg.batch_size,
            "student": bench.cfg.student_size,
            "teacher": bench.cfg.teacher_arch,
            "train_rows": rows,
            "rows_per_epoch": f"{epoch_rows(bench)} (train_rows repeated)",
            "timed_epochs": bench.settings.throughput_epochs,
        },
        "targets": [
            target(
                f"cached >= 3x online images/s at image size {bench.cfg.image_size}, epochs of {epoch_rows(bench):,} images",
                speedup,
                3.0,
                why=WHY.format(rows=rows, steps=-(-rows // bench.cfg.batch_size), batch=bench.cfg.batch_size),
            )
        ],
    }
    print(
        f"part 1: cached {measured['cached']:.0f} img/s vs online {measured['online']:.0f} img/s -> {speedup:.2f}x; XLA on cached "
        f"x{result['xla_gain_cached']:.2f} (first epoch {first_epoch_s['cached_xla']:.1f} s vs {first_epoch_s['cached']:.1f} s)"
    )
    return result
