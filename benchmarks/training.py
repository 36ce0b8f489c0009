"""Part 7: training speed (issue 22). Images/s of a teacher's and a cached-logit student's cross-validation on real
4-class scans under today's settings, each speed lever alone and all of them together, side by side in one run,
with each variant's fold F1; and the ``main`` chain (teacher, search, promotion) under the fast settings against today's
(the bench's own chain), per 1,000 images, with its teacher's and best trial's k-fold F1.

Today's settings are the defaults before the levers: batch 16, one step per call, augmentation views made one at a
time, folds one after another. Every variant trains the same folds, rows, seeds and epochs (no early stopping, so
each trains every epoch), so images/s is (training rows x epochs x folds) / wall time of the whole cross-validation,
tracing, evaluation and (for fold workers) their start included.

``python -m benchmarks.training [--smoke]`` runs this part alone in a temporary store.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
from tqdm import tqdm

from benchmarks.common import TODAY, Bench, ratio, target
from pipelines.config import FAST_TRAINING, PROJECT_ROOT, Config
from pipelines.evaluation.metrics import model_logits
from pipelines.names import Metric
from pipelines.steps.distill import FoldStudent
from pipelines.steps.prepare import Prepared, prepare_data
from pipelines.steps.teacher import FoldTeacher, at_teacher_size
from pipelines.training.compiled import forget_compiled_steps
from pipelines.training.crossval import CrossValidation, cross_validate

FOUR_CLASS_DIR = PROJECT_ROOT.parent / "shared" / "data" / "brain-mri-4class"
# The value each lever is measured at alone, over today's settings (benchmarks.common.TODAY, the bench's own chain's);
# the fast settings (FAST_TRAINING: the levers that measured faster) are the "all" variant's and the second chain's.
LEVERS = {"batch_size": 64, "steps_per_execution": 8, "parallel_augment": True, "fold_workers": 2}
# (bfloat16 is measured in part 6, scaling: emulated on CPUs without AVX-512 BF16 or AMX, it would take the part hours.)
FAST = FAST_TRAINING
# Per mode: scans per class of the 4-class subsample, folds, epochs, teacher sizes (the student's first). Each lever alone
# runs at the student's size only (at the larger teacher size it would double the part's time), and not at all in smoke
# runs, which check the code in CI's budget.
SIZES = {"full": (150, 3, 3, (64, 128)), "smoke": (6, 2, 1, (32,))}


def subsample(data_dir: Path, work: Path, per_class: int) -> Path:
    """The first ``per_class`` scans (by name) of each class folder, copied into ``work`` (data readers refuse links that
    leave the data folder): a fixed subset."""
    subset = work / "four-class"
    for folder in sorted(path for path in data_dir.iterdir() if path.is_dir()):
        (subset / folder.name).mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.iterdir())[:per_class]:
            shutil.copy(path, subset / folder.name / path.name)
    return subset


def variants() -> dict[str, dict]:
    """today, each lever alone (LEVERS), and the fast settings (FAST) over today's."""
    return {"today": dict(TODAY), **{lever: {**TODAY, lever: value} for lever, value in LEVERS.items()}, "all": {**TODAY, **FAST}}


def timed_cv(prepared: Prepared, cfg: Config, build, logits: dict | None, describe: str) -> tuple[dict, CrossValidation]:
    """One cross-validation under its own MLflow run: images/s over all its folds, its wall time and fold F1."""
    folds = list(range(cfg.fold_count))
    with mlflow.start_run(run_name=f"bench-training {describe}"):
        start = time.perf_counter()
        cv = cross_validate(prepared, cfg, folds, build, lambda k: None if logits is None else logits[k], describe)
        wall = time.perf_counter() - start
    images = sum(len(prepared.splits.folds[k][0]) for k in folds) * cfg.epochs
    summary = cv.summary()
    return {"images_per_s": images / wall, "wall_s": wall, "f1_mean": summary[Metric.F1_MEAN], "f1_std": summary[Metric.F1_STD]}, cv


def throughput(cfg: Config, prepared: Prepared, sizes: tuple[int, ...], each_lever: bool) -> dict:
    """Teacher and cached-logit student cross-validations per variant (``each_lever``: every lever alone too, at the
    student's size); the student's logits are those of today's teacher at the student's size (fold k's on every image)."""
    measured: dict[str, dict] = {"teacher": {}, "student": {}}
    names = [name for name in variants() if each_lever or name in ("today", "all")]
    plan = [("teacher", size, name) for size in sizes for name in names if size == sizes[0] or name in ("today", "all")]
    plan += [("student", sizes[0], name) for name in names]
    logits = None
    for role, size, name in tqdm(plan, desc="part 7: training speed", unit="variant"):
        variant = cfg.replace(**variants()[name], image_size=sizes[0], teacher_image_size=size if size != sizes[0] else 0)
        forget_compiled_steps()  # a variant reuses its own folds' traced steps, never the previous variant's
        if role == "teacher":
            build = FoldTeacher(variant, prepared.dataset.num_classes)
            result, cv = timed_cv(at_teacher_size(variant, prepared), variant, build, None, f"teacher {size}px {name}")
            if logits is None:
                logits = {k: model_logits(model, prepared.images) for k, model in zip(cv.fold_ids, cv.models)}
        else:
            build = FoldStudent(variant, prepared.dataset.num_classes, teacher_run_id=None)
            result, _ = timed_cv(prepared, variant.replace(alpha=0.5), build, logits, f"student {name}")
        measured[role][f"{size}px {name}"] = result
        print(f"part 7: {role} {size}px {name}: {result['images_per_s']:.1f} images/s, F1 {result['f1_mean']:.3f}")
    return measured


def main_chain(bench: Bench, cfg: Config) -> dict:
    """The ``main`` chain on the bench's data under ``cfg`` in its own study and registered model: teacher, search (in a
    child process, as part 2 runs it: its peak memory that of all its processes) and promotion, each timed."""
    from benchmarks.search_cost import run_strategy
    from pipelines.steps.teacher import train_teacher
    from registry.promote import promote

    work = bench.work / f"chain-{cfg.study_name}"
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    teacher_run = train_teacher(cfg, bench.prepared)
    teacher_s = time.perf_counter() - start
    search = run_strategy("ours", cfg, bench.tracking_uri, work)
    start = time.perf_counter()
    promote(cfg)
    promote_s = time.perf_counter() - start
    return {"teacher_s": teacher_s, "search_s": search["wall_s"], "promote_s": promote_s, "search": search, **teacher_scores(teacher_run)}


def teacher_scores(teacher_run_id: str) -> dict[str, float]:
    """The k-fold F1 (mean, std) of a chain's teacher (an ensemble's first member), beside its student's."""
    metrics = mlflow.get_run(teacher_run_id.split(",")[0]).data.metrics
    return {"teacher_f1": metrics[Metric.F1_MEAN], "teacher_f1_std": metrics[Metric.F1_STD]}


def chain_seconds(chain: dict) -> float:
    return chain["teacher_s"] + chain["search_s"] + chain["promote_s"]


def run(bench: Bench, today_chain: dict, data_dir: Path = FOUR_CLASS_DIR) -> dict:
    """The variants on a fixed 4-class subsample (the synthetic 4-class set when that folder is absent), and the main
    chain under the fast settings against ``today_chain`` (the bench's own chain, under today's settings:
    :func:`main_chain`'s keys)."""
    per_class, folds, epochs, sizes = SIZES[bench.settings.mode]
    found = data_dir.is_dir()
    cfg = Config(
        data_dir=str(subsample(data_dir, bench.work, per_class)) if found else "",
        synthetic_images=per_class * 4,
        synthetic_classes=4,
        image_size=sizes[0],
        folds=folds,
        epochs=epochs,
        patience=epochs,  # every variant trains every epoch: equal work
        augment=True,
        cache_dir=bench.cfg.cache_dir,
    )
    prepared = prepare_data(cfg)
    measured = throughput(cfg, prepared, sizes, each_lever=bench.settings.mode == "full")
    teacher, student = measured["teacher"], measured["student"]
    low = f"{sizes[0]}px"
    result = {
        "setup": {
            "data": f"brain-mri-4class, first {per_class} scans per class" if found else f"synthetic, {per_class * 4} images",
            "images": int(len(prepared.dataset.labels)),
            "folds": folds,
            "epochs": epochs,
            "augment": True,
            "today": TODAY,
            "levers": LEVERS,
            "fast": FAST,
        },
        "teacher": teacher,
        "student": student,
        "teacher_speedup": ratio(teacher[f"{low} all"]["images_per_s"], teacher[f"{low} today"]["images_per_s"]),
        "student_speedup": ratio(student[f"{low} all"]["images_per_s"], student[f"{low} today"]["images_per_s"]),
    }
    assert all(getattr(bench.cfg, lever) == value for lever, value in TODAY.items()), "the bench's own chain runs today's settings"
    fast = main_chain(bench, bench.cfg.replace(**FAST, study_name="bench-fast", model_name=f"{bench.cfg.model_name}-fast"))
    images = len(bench.prepared.dataset.labels)
    result["main"] = {
        "today": today_chain,
        "fast": fast,
        "today_per_1000_s": chain_seconds(today_chain) * 1000 / images,
        "fast_per_1000_s": chain_seconds(fast) * 1000 / images,
        "f1_drop": today_chain["search"]["best_f1"] - fast["search"]["best_f1"],
        "f1_std_today": today_chain["search"]["best_f1_std"],
    }
    result["main"]["speedup"] = ratio(result["main"]["today_per_1000_s"], result["main"]["fast_per_1000_s"])
    result["targets"] = [
        target(f"teacher training images/s >= 2x today's at {sizes[0]} px", result["teacher_speedup"], 2.0),
        target("cached-logit student training images/s >= 2x today's", result["student_speedup"], 2.0),
        target("Main per 1,000 images >= 3x lower than today's settings", result["main"]["speedup"], 3.0),
        target(
            "Main per 1,000 images: best-trial k-fold F1 drop vs today's <= its fold-to-fold std",
            result["main"]["f1_drop"],
            result["main"]["f1_std_today"],
            at_least=False,
        ),
    ]
    main = result["main"]
    print(
        f"part 7: teacher x{result['teacher_speedup']:.2f}, student x{result['student_speedup']:.2f}, main per 1,000 images "
        f"{main['today_per_1000_s'] / 60:.2f} -> {main['fast_per_1000_s'] / 60:.2f} min (x{main['speedup']:.2f})"
    )
    return result


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import FULL, REAL_DATA_DIR, SMOKE, open_bench

    parser = argparse.ArgumentParser(description="Part 7 alone: training speed of each lever, side by side.")
    parser.add_argument("--smoke", action="store_true", help="tiny data and settings: checks the code, not the figures")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kd-bench-training-"))
    try:
        bench = open_bench(SMOKE if args.smoke else FULL, work, REAL_DATA_DIR)
        result = run(bench, main_chain(bench, bench.cfg))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
