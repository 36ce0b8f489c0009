"""Latency, measured one way wherever it is logged (the search's ``latency_ms``, the edge export's
``edge_<format>_p50_ms``, the benchmarks): wall time of whole calls after untimed warm-up calls, summarised as the
50th and 95th percentiles in milliseconds. A Keras model is timed as a compiled graph on a fixed batch, as a server
runs it, so the first call's tracing is warm-up and never timed."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

WARMUP = 5  # untimed calls first: graph tracing, allocator and cache warm-up
REPEATS = 50


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    """``p50_ms`` and ``p95_ms`` of wall times given in seconds; NaN when nothing was measured."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if not len(ms):
        return {"p50_ms": float("nan"), "p95_ms": float("nan")}
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def latency_percentiles(call: Callable[[], object], repeats: int = REPEATS, warmup: int = WARMUP) -> dict[str, float]:
    """p50 and p95 wall time of ``call()`` in milliseconds over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        timings.append(time.perf_counter() - start)
    return percentiles_ms(timings)


def keras_latency(model, images: np.ndarray, batch: int = 1, repeats: int = REPEATS) -> dict[str, float]:
    """:func:`latency_percentiles` of one inference forward pass of ``batch`` images (``images`` repeated or cut to
    that many) through the model compiled with ``tf.function``, the result copied back to the host."""
    forward = tf.function(lambda x: model(x, training=False))
    inputs = tf.constant(np.resize(images, (batch, *images.shape[1:])).astype(np.float32))
    return latency_percentiles(lambda: forward(inputs).numpy(), repeats)
