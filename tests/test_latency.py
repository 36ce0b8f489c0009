"""One latency measurement for every logged latency: warm-up calls untimed, p50 and p95 of the timed calls in ms."""

from __future__ import annotations

import math

import numpy as np

from pipelines.evaluation.latency import keras_latency, latency_percentiles, percentiles_ms
from pipelines.models.builders import build_student


def test_percentiles_are_of_the_given_seconds_in_milliseconds_and_nan_when_nothing_was_timed():
    assert percentiles_ms([0.001, 0.002, 0.003]) == {"p50_ms": 2.0, "p95_ms": 2.9}
    assert all(math.isnan(value) for value in percentiles_ms([]).values())


def test_the_warm_up_calls_are_made_but_not_timed():
    calls = []
    result = latency_percentiles(lambda: calls.append(1), repeats=7, warmup=3)
    assert len(calls) == 10 and set(result) == {"p50_ms", "p95_ms"}


def test_a_keras_model_is_timed_on_any_batch_size_from_fewer_images():
    images = np.zeros((3, 32, 32, 1), np.float32)
    timed = keras_latency(build_student("tiny", 32, 2), images, batch=5, repeats=4)
    assert 0 < timed["p50_ms"] <= timed["p95_ms"] < 60_000
