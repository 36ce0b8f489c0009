"""Part 3: the all-data teacher vs the promoted student on the hold-out split.

FLOPs are counted, not profiled: multiply-accumulates of every Conv2D, DepthwiseConv2D and Dense layer from
its output shape and kernel (MACs = output positions x kernel weights, i.e. output pixels x output channels x
kernel area x input channels / groups; Dense: inputs x units), FLOPs = 2 x MACs. Normalisation, activations, pooling
and additions are left out: they are a few percent of the convolutions here and the same rule applies to both models.

The F1 target compares the two on the F1 scans (``benchmarks.scans``; ``WHY`` says why), with a paired bootstrap
interval; the hold-out F1 and ROC-AUC are still reported.
"""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
from tqdm import tqdm

from benchmarks.common import SIZE_RATIO, Bench, ratio, target
from benchmarks.scans import binary_f1, f1_difference, f1_scans
from pipelines.data.images import load_images
from pipelines.evaluation.latency import keras_latency
from pipelines.evaluation.metrics import classification_metrics, model_logits, probabilities
from pipelines.steps.teacher import load_teacher_model
from registry.export import load_student


def _layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        else:
            yield layer


WHY = (
    "scored on the F1 scans (part 3's setup), no longer on the {holdout} hold-out scans, where one scan's prediction moves "
    "F1 by about the tolerance itself (compare the two 95% paired bootstrap intervals in part 3), so the target read one "
    "scan of luck"
)


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one image's forward pass through the convolutions and dense layers."""
    total = 0
    for layer in _layers(model):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            # Every kernel weight is used once per output position: Conv2D (kh, kw, in/groups, out),
            # DepthwiseConv2D (kh, kw, in, multiplier), Dense (in, out) with one position per vector.
            positions = math.prod(layer.output.shape[1:-1])
            total += positions * math.prod(layer.kernel.shape)
    return int(total)


def describe(model: keras.Model, bench: Bench, path: Path) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The model's size, cost, latency and hold-out metrics, and its predicted classes of the hold-out and F1 scans."""
    prepared, test = bench.prepared, bench.prepared.splits.test
    model.save(path)
    size = model.input_shape[1]  # a teacher may work at a higher resolution than its student (teacher_image_size)
    images = (prepared.images if size == prepared.images.shape[1] else load_images(prepared.dataset, size, bench.cfg.cache_dir))[test]
    holdout = probabilities(model_logits(model, images), prepared.dataset.binary)
    metrics = classification_metrics(prepared.dataset.labels[test], holdout)
    scans = f1_scans(bench, size)
    predicted = {"holdout": holdout.argmax(1), "scans": probabilities(model_logits(model, scans.images), prepared.dataset.binary).argmax(1)}
    repeats = bench.settings.latency_repeats
    b1, b32 = keras_latency(model, images, 1, repeats), keras_latency(model, images, 32, max(10, repeats // 4))
    macs = float(count_macs(model))
    return {
        "params": float(model.count_params()),
        "file_bytes": float(path.stat().st_size),
        "macs": macs,
        "flops": 2.0 * macs,
        "batch1_p50_ms": b1["p50_ms"],
        "batch1_p95_ms": b1["p95_ms"],
        "batch32_p50_ms": b32["p50_ms"],
        "batch32_p95_ms": b32["p95_ms"],
        "f1": metrics["f1"],
        "roc_auc": metrics["roc_auc"],
        "scans_f1": binary_f1(scans.labels, predicted["scans"]),
    }, predicted


def run(bench: Bench) -> dict:
    models = {"teacher": load_teacher_model(bench.teacher_run_id, "all"), "student": load_student(bench.cfg.model_name, bench.version)}
    described = {
        name: describe(model, bench, bench.work / f"{name}.keras")
        for name, model in tqdm(models.items(), desc="part 3: compression", unit="model")
    }
    measured = {name: figures for name, (figures, _) in described.items()}
    scans = f1_scans(bench, bench.cfg.image_size)
    test = bench.prepared.dataset.labels[bench.prepared.splits.test]
    teacher_predicted, student_predicted = described["teacher"][1], described["student"][1]
    gap = f1_difference(scans.labels, teacher_predicted["scans"], student_predicted["scans"])
    holdout_gap = f1_difference(test, teacher_predicted["holdout"], student_predicted["holdout"])
    teacher, student = measured["teacher"], measured["student"]
    ratios = {
        key: ratio(teacher[key], student[key])
        for key in ("params", "file_bytes", "flops", "batch1_p50_ms", "batch1_p95_ms", "batch32_p50_ms", "batch32_p95_ms")
    }
    result = {
        **measured,
        "teacher_over_student": ratios,
        "f1_drop": teacher["f1"] - student["f1"],  # on the hold-out split
        "holdout_f1_drop": holdout_gap,
        "scans_f1_drop": gap,
        "setup": {
            "holdout_images": int(len(bench.prepared.splits.test)),
            "image_size": bench.cfg.image_size,
            "student_version": bench.version,
            "f1_scans": scans.name,
            "flops_method": "2 x MACs of Conv2D/DepthwiseConv2D/Dense layers from their kernel and output shapes",
        },
        "targets": [
            target(f"student >= {SIZE_RATIO}x fewer parameters", ratios["params"], SIZE_RATIO),
            target("student >= 3x lower batch-1 latency (p50)", ratios["batch1_p50_ms"], 3.0),
            target(
                f"student F1 within 0.02 of the teacher on {len(scans.labels):,} F1 scans (teacher - student <= 0.02)",
                gap["difference"],
                0.02,
                at_least=False,
                why=WHY.format(holdout=len(test)),
            ),
        ],
    }
    print(
        f"part 3: params {ratios['params']:.1f}x, FLOPs {ratios['flops']:.1f}x, batch-1 p50 {ratios['batch1_p50_ms']:.2f}x, "
        f"hold-out F1 teacher {teacher['f1']:.4f} vs student {student['f1']:.4f}; on {len(scans.labels)} F1 scans "
        f"{teacher['scans_f1']:.4f} vs {student['scans_f1']:.4f} (difference {gap['difference']:+.4f}, "
        f"95% [{gap['low']:+.4f}, {gap['high']:+.4f}])"
    )
    return result
