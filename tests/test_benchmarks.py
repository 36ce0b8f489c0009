"""The benchmark code: TFLite export agrees with Keras, FLOPs are counted right, ratios and targets follow
from the measured numbers, and the report shows every figure of a results file."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil

import keras
import mlflow
import numpy as np
import pytest
from kdtest import tiny_config, tracking_at
from sklearn.metrics import f1_score

from benchmarks import report, scaling, scans, throughput
from benchmarks.common import EXTERNAL_DATA_DIR, SMOKE, Bench, open_bench, ratio, target
from benchmarks.compression import count_macs
from benchmarks.edge import batched_call
from pipelines.evaluation.metrics import probabilities
from pipelines.models.builders import build_student
from pipelines.models.distiller import Distiller
from pipelines.steps.prepare import prepare_data
from pipelines.training.fit import class_weights, make_dataset, set_seed
from pipelines.training.quantize import TFLiteModel, int8_export, to_tflite


def test_int8_tflite_agrees_with_keras_on_most_real_scans(mri_subset, tmp_path):
    prepared = prepare_data(tiny_config(mri_subset, tmp_path))
    labels, rows = prepared.dataset.labels, prepared.splits.train
    set_seed(0)
    student = build_student("tiny", 32, 2, seed=0)
    trainer = Distiller(student, None, 1.0, 1.0, binary=True)
    trainer.compile(optimizer=keras.optimizers.Adam(3e-3))
    weights = class_weights(labels[rows], 2)[labels[rows]]
    trainer.fit(make_dataset(prepared.images[rows], labels[rows], weights, batch_size=8, shuffle=True), epochs=5, verbose=0)

    images = prepared.images
    keras_logits = np.asarray(student(images, training=False))
    float_logits = TFLiteModel(to_tflite(student)).logits(images)
    int8 = TFLiteModel(to_tflite(student, images[rows]))
    assert int8.input["dtype"] == np.int8 and int8.output["dtype"] == np.int8, "full-integer model: int8 in and out"
    int8_logits = int8.logits(images)
    np.testing.assert_allclose(float_logits, keras_logits, rtol=1e-4, atol=1e-4)
    agree = np.mean(probabilities(int8_logits, True).argmax(1) == probabilities(keras_logits, True).argmax(1))
    assert agree >= 0.8, f"INT8 agrees with Keras on only {agree:.0%} of the images"


def test_macs_are_counted_from_kernels_and_output_shapes():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8x8 outputs x 4 channels x 3x3x1
    inner = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.DepthwiseConv2D(3, padding="same")], name="nested")  # 8x8 x 4 x 3x3
    x = inner(x)
    x = keras.layers.Conv2D(6, 3, strides=2)(x)  # valid, stride 2: 3x3 outputs x 6 channels x 3x3x4
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2)(x)  # 6 x 2
    model = keras.Model(inputs, outputs)
    assert count_macs(model) == 8 * 8 * 4 * 9 + 8 * 8 * 4 * 9 + 3 * 3 * 6 * 9 * 4 + 6 * 2


def test_ratios_and_targets_follow_the_numbers():
    assert ratio(6.0, 2.0) == 3.0
    assert math.isnan(ratio(1.0, 0.0))
    assert target("x", 3.0, 3.0)["met"] and not target("x", 2.99, 3.0)["met"]
    assert target("y", 0.02, 0.02, at_least=False)["met"] and not target("y", 0.021, 0.02, at_least=False)["met"]
    assert not target("z", float("nan"), 1.0)["met"] and not target("z", float("nan"), 1.0, at_least=False)["met"]


def test_a_target_measured_differently_carries_its_reason_and_one_that_is_not_carries_none():
    assert target("x", 1.0, 1.0, why="timed on a batch")["why"] == "timed on a batch"
    assert "why" not in target("x", 1.0, 1.0)


def test_the_paired_f1_difference_is_the_difference_of_the_two_f1s_inside_its_bootstrap_interval():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    a = np.where(rng.random(400) < 0.85, labels, 1 - labels)  # right on 85% of scans
    b = np.where(rng.random(400) < 0.70, labels, 1 - labels)
    gap = scans.f1_difference(labels, a, b)
    assert gap["difference"] == pytest.approx(f1_score(labels, a) - f1_score(labels, b))
    assert gap["low"] < gap["difference"] < gap["high"] and gap["low"] > 0, "15 points of accuracy apart on 400 scans: resolved"
    assert scans.binary_f1(labels, b) == pytest.approx(f1_score(labels, b))
    same = scans.f1_difference(labels, a, a)
    assert same["difference"] == same["low"] == same["high"] == 0
    narrow = scans.f1_difference(np.tile(labels, 10), np.tile(a, 10), np.tile(b, 10))
    assert narrow["high"] - narrow["low"] < (gap["high"] - gap["low"]) / 2, "ten times the scans: a much narrower interval"


def test_a_batched_interpreter_call_gives_the_outputs_of_one_image_at_a_time(mri_subset, tmp_path):
    prepared = prepare_data(tiny_config(mri_subset, tmp_path))
    student = build_student("tiny", 32, 2, seed=0, norm="batch")  # the benchmark's students: GroupNorm bakes in batch 1
    images = prepared.images[:5]
    for flatbuffer in (to_tflite(student), int8_export(student, prepared.images)):  # float32, full-integer INT8
        one_by_one = TFLiteModel(flatbuffer)
        raw = batched_call(flatbuffer, images, 8)()  # 8 from 5 images: repeated, as np.resize does
        scale, zero = one_by_one.output["quantization"]
        logits = (raw.astype(np.float32) - zero) * scale if one_by_one.output["dtype"] == np.int8 else raw
        np.testing.assert_allclose(logits, one_by_one.logits(np.resize(images, (8, *images.shape[1:]))), rtol=1e-5, atol=1e-5)


def test_the_f1_scans_are_a_fixed_balanced_draw_without_copies_of_the_benchmarks_own_scans(mri_subset, tmp_path):
    if not EXTERNAL_DATA_DIR.is_dir():
        pytest.skip(f"the 4-class set is not at {EXTERNAL_DATA_DIR}")
    chosen = scans._choose(6)
    assert chosen == scans._choose(6), "the same scans every run"
    assert sorted(chosen.values()).count("no") == 6 and sorted(chosen.values()).count("yes") == 6
    # the benchmark's data holds (a copy of) one of the drawn no-tumour scans: it must not be scored on it
    data = tmp_path / "data"
    shutil.copytree(mri_subset, data)
    copied = next(path for path, label in chosen.items() if label == "no")
    shutil.copy(copied, data / "no" / copied.name)
    cfg = tiny_config(data, tmp_path)
    bench = Bench(dataclasses.replace(SMOKE, external_per_class=6), cfg, tmp_path / "work", "", prepare_data(cfg))
    found = scans.f1_scans(bench, 32)
    assert found.left_out >= 1 and len(found.labels) == 12 - found.left_out
    assert (found.labels == 1).sum() == 6 and found.images.shape == (len(found.labels), 32, 32, 1)
    assert scans.f1_scans(bench, 32) is found, "read once per image size"
    assert f"{len(found.labels)} scans of brain-mri-4class" in found.name


@pytest.mark.slow
def test_throughput_ratio_is_computed_from_the_measured_images_per_second(mri_subset, tmp_path, monkeypatch):
    from pipelines.steps.teacher import train_teacher

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # open_bench exports its store for its children: undone after the test
    with tracking_at(mlflow.get_tracking_uri()):
        bench: Bench = open_bench(SMOKE, tmp_path / "work", mri_subset)
        bench.teacher_run_id = train_teacher(bench.cfg, bench.prepared)
        result = throughput.run(bench)
    measured = result["images_per_s"]
    assert set(measured) == {"online", "cached", "cached_xla"} and all(v > 0 for v in measured.values())
    assert result["cached_vs_online"] == pytest.approx(measured["cached"] / measured["online"])
    assert result["xla_gain_cached"] == pytest.approx(measured["cached_xla"] / measured["cached"])
    [goal] = result["targets"]
    assert goal["value"] == result["cached_vs_online"] and goal["met"] == (result["cached_vs_online"] >= 3.0)


def sample_results(rng: np.random.Generator, current: bool = True) -> dict:
    """A results file with the structure the benchmark writes and arbitrary numbers; ``current=False``: as the runs
    before the F1 scans, the batch timing, the HTTP floor and the device line wrote them."""
    n = lambda: float(rng.uniform(0.001, 5000))  # noqa: E731
    goal = lambda: target("a target", n(), n(), bool(rng.integers(2)), why="measured anew" if current else "")  # noqa: E731
    gap = lambda: {"difference": n(), "low": n(), "high": n(), "scans": 1100.0}  # noqa: E731
    model = lambda: {
        k: n()
        for k in (
            "params",
            "file_bytes",
            "macs",
            "flops",
            "batch1_p50_ms",
            "batch1_p95_ms",
            "batch32_p50_ms",
            "batch32_p95_ms",
            "f1",
            "roc_auc",
            *(("scans_f1",) if current else ()),
        )
    }  # noqa: E731
    strategy = lambda: {
        "wall_s": n(),
        "best_f1": n(),
        "best_f1_std": n(),
        "best_params": {"width": 16},
        "trials": 4.0,
        "pruned": 1.0,
        "folds_trained": 11.0,
        "peak_rss_mib": n(),
    }  # noqa: E731
    costs = lambda: {"images": n(), "image_size": n(), "teacher_epoch_s": n(), "student_kd_epoch_s": n(), "student_inference_s": n()}  # noqa: E731
    results = {
        "date": "2026-01-02",
        "started_utc": "2026-01-02T03:04:05+00:00",
        "total_s": n(),
        "machine": {
            "cpu": "test cpu",
            "cpu_count": 2,
            "memory_gib": n(),
            "gpus": [],
            "platform": "linux",
            "python": "3.11",
            "packages": {"keras": "3"},
        },
        "settings": {"mode": "smoke", "image_size": 32},
        "config": {"folds": 2},
        "pipeline": {"teacher_s": n(), "promote_s": n()},
        "data": {"images": 24, "holdout": 5, "source": "folder", "classes": ["no", "yes"], "digest": "abc"},
        "throughput": {
            "images_per_s": {v: n() for v in ("online", "cached", "cached_xla")},
            "first_epoch_s": {v: n() for v in ("online", "cached", "cached_xla")},
            "cached_vs_online": n(),
            "xla_gain_cached": n(),
            "best_cached_vs_online": n(),
            "setup": {"batch_size": 16},
            "targets": [goal()],
        },
        "search": {
            "ours": strategy(),
            "naive": strategy(),
            "naive_vs_ours_wall": n(),
            "best_f1_gap": n(),
            "setup": {"trials": 4},
            "targets": [goal(), goal()],
        },
        "compression": {
            "teacher": model(),
            "student": model(),
            "teacher_over_student": {
                k: n() for k in ("params", "file_bytes", "flops", "batch1_p50_ms", "batch1_p95_ms", "batch32_p50_ms", "batch32_p95_ms")
            },
            "f1_drop": n(),
            "setup": {"flops_method": "counted"},
            "targets": [goal(), goal(), goal()],
        },
        "edge": {
            "formats": {
                f: {"size_bytes": n(), "p50_ms": n(), "p95_ms": n(), "f1": n(), "roc_auc": n()} for f in ("keras", "float32", "int8")
            },
            "keras_over_int8_batch1_p50": n(),
            "keras_over_float32_batch1_p50": n(),
            "int8_vs_float32_f1_gap": n(),
            "logged_to_run": "run1",
            "setup": {},
            "targets": [goal(), goal()],
        },
        "serving": {
            "in_process_one_image": {"p50_ms": n(), "p95_ms": n()},
            "clients": {
                c: {"p50_ms": n(), "p95_ms": n(), "requests_per_s": n(), "requests": 9.0, "errors": 0.0, "seconds": n()}
                for c in ("1", "4", "16")
            },
            "served_over_in_process_p50": n(),
            "setup": {},
            "targets": [goal()],
        },
        "scaling": {
            "by_images": [{"factor": float(f), **costs()} for f in (1, 2, 4)],
            "by_size": [{"pixels": float(s * s), **costs()} for s in (64, 128)],
            "loglog_slopes": {axis: {c: n() for c in report.COST_LABELS} for axis in ("vs_images", "vs_pixels")},
            "search_peak_rss_mib": n(),
            "precision": {
                p: {c: n() for c in ("teacher_epoch_s", "student_kd_epoch_s")} for p in ("float32", "bfloat16", "float32_over_bfloat16")
            },
            "input_pipeline": {
                **{v: {"images_per_s": n(), "peak_rss_growth_mib": n()} for v in ("before", "after", "before_over_after")},
                "images": n(),
                "image_mib": n(),
            },
            "setup": {},
            "targets": [goal()],
        },
    }
    if current:
        results["device"] = "GPU: Test H100"
        results["compression"] |= {"holdout_f1_drop": gap(), "scans_f1_drop": gap()}
        results["compression"]["setup"]["f1_scans"] = "1,100 scans of brain-mri-4class"
        results["edge"] |= {
            "float32_minus_int8_f1": {"int8": n()},
            "float32_over_int8_batch1_p50": n(),
            "holdout_float32_minus_int8_f1": {"int8": gap()},
            "batch32_p50_ms": {"float32": n(), "int8": n()},
            "float32_over_int8_batch32_p50": n(),
            "scans_f1": {"keras": n(), "float32": n(), "int8": n()},
            "scans_float32_minus_int8_f1": {"int8": gap()},
        }
        results["edge"]["setup"] = {"served_int8": "int8", "f1_scans": "1,100 scans of brain-mri-4class"}
        results["serving"] |= {"http_floor_ping": {"p50_ms": n(), "p95_ms": n()}, "served_above_floor_over_in_process_p50": n()}
        variant = lambda: {"images_per_s": n(), "wall_s": n(), "f1_mean": n(), "f1_std": n()}  # noqa: E731
        chain = lambda: {
            "teacher_s": n(),
            "search_s": n(),
            "promote_s": n(),
            "search": strategy(),
            "teacher_f1": n(),
            "teacher_f1_std": n(),
        }  # noqa: E731
        results["training"] = {
            "setup": {"today": {"batch_size": 16}, "levers": {"batch_size": 64}, "fast": {"batch_size": 64}, "epochs": 3},
            "teacher": {f"{size} {name}": variant() for size in ("64px", "128px") for name in ("today", "all")},
            "student": {f"64px {name}": variant() for name in ("today", "batch_size", "all")},
            "teacher_speedup": n(),
            "student_speedup": n(),
            "main": {"today": chain(), "fast": chain(), "today_per_1000_s": n(), "fast_per_1000_s": n(), "speedup": n()},
            "targets": [goal(), goal(), goal()],
        }
    return results


@pytest.mark.parametrize("current", [True, False], ids=["current results", "results from before the new figures"])
def test_report_shows_every_figure_target_and_plot(tmp_path, current):
    results = sample_results(np.random.default_rng(7), current)
    json_path = tmp_path / "results" / "2026-01-02.json"
    json_path.parent.mkdir()
    plots = report.render(results, json_path, tmp_path / "BENCHMARKS.md")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert ("training" in results) == current, "a results file from before part 7 re-renders without it"
    for part in (part for part in report.PARTS if part in results):
        for key, value in report.figures(results[part]):
            assert f"| {key} | {report.fmt(value)} |" in text, (part, key)
    targets = [t for part in report.PARTS if part in results for t in results[part]["targets"]]
    assert len(re.findall(r"\| (met|\*\*not met\*\*) \|", text)) == len(targets)
    assert text.count("**not met**") == sum(not t["met"] for t in targets)
    assert len(plots) == 3
    for plot in plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot.relative_to(tmp_path)})" in text
    assert ("**Device:** GPU: Test H100." if current else "**Device:** CPU only.") in text
    assert text.count("*a target*: measured anew.") == (len(targets) if current else 0), "each changed target says why"
    if current:
        gap = results["compression"]["scans_f1_drop"]
        assert f"**{report.fmt(gap['difference'])} [{report.fmt(gap['low'])}, {report.fmt(gap['high'])}] (1,100 scans)**" in text


def test_the_leaner_input_pipeline_gives_the_very_same_batches_as_the_one_it_replaced():
    """Dropping the .cache() and the float32 copy (benchmarks/scaling.py measures the memory) changes no batch."""
    rng = np.random.default_rng(3)
    images, labels = rng.normal(size=(40, 8, 8, 1)).astype(np.float32), rng.integers(0, 2, 40)
    before, after = scaling._old_pipeline(images, labels, 16, seed=5), make_dataset(images, labels, batch_size=16, shuffle=True, seed=5)
    for _ in range(2):  # reshuffled each epoch, alike
        pairs = list(zip(before, after, strict=True))
        assert len(pairs) == 3
        for (old_x, old_y), (new_x, new_y) in pairs:
            assert np.array_equal(old_x["image"], new_x["image"]) and np.array_equal(old_y, new_y)


def test_main_time_per_1000_images_is_the_measured_steps_scaled_to_1000_images():
    results = {"pipeline": {"teacher_s": 100.0, "promote_s": 50.0}, "search": {"ours": {"wall_s": 350.0}}, "data": {"images": 250}}
    assert report.main_per_1000_images(results) == pytest.approx(2000.0)
