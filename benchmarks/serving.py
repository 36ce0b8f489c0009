"""Part 5: `mlflow models serve` on the Production model under 1, 4 and 16 concurrent clients on loopback.

Each client sends one real MRI file per request (the hold-out files in turn) and waits for the answer before
sending the next, for a fixed time per level. The baseline is the same model in-process: ``pyfunc.predict``
of one image file, which includes the same decoding and preprocessing.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import mlflow
import pandas as pd
from tqdm import tqdm

from benchmarks.common import Bench, ratio, target
from pipelines.latency import latency_percentiles, percentiles_ms
from registry.model import encode_file
from registry.server import serve_model


def post(port: int, body: bytes) -> float:
    """Seconds for one request; raises on any non-200 answer."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
    return time.perf_counter() - start


def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    """``clients`` closed-loop clients for ``seconds``: latency percentiles and completed requests per second."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        sent = offset
        while time.perf_counter() < deadline:
            try:
                elapsed = post(port, bodies[sent % len(bodies)])
                with lock:
                    latencies.append(elapsed)
            except (OSError, RuntimeError):
                with lock:
                    errors[0] += 1
            sent += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {
        **percentiles_ms(latencies),
        "requests_per_s": len(latencies) / wall,
        "requests": float(len(latencies)),
        "errors": float(errors[0]),
        "seconds": wall,
    }


def run(bench: Bench) -> dict:
    prepared = bench.prepared
    files = prepared.dataset.manifest["path"].to_numpy()[prepared.splits.test]
    images = [encode_file(f) for f in files]
    bodies = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]]}}).encode() for image in images]
    model_uri = f"models:/{bench.cfg.model_name}/Production"

    local = mlflow.pyfunc.load_model(model_uri)
    frames = [pd.DataFrame({"image": [image]}) for image in images]
    turn = iter(range(10**9))
    in_process = latency_percentiles(lambda: local.predict(frames[next(turn) % len(frames)]), bench.settings.latency_repeats)

    print("part 5: starting mlflow models serve")
    server, port = serve_model(model_uri, bench.tracking_uri)
    try:
        for body in bodies[:5]:  # warm-up: every worker has traced its graph before timing starts
            post(port, body)
        levels = {
            str(n): load(port, bodies, n, bench.settings.serve_seconds)
            for n in tqdm(bench.settings.clients, desc="part 5: serving", unit="level")
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
    one = levels[str(bench.settings.clients[0])]
    over = ratio(one["p50_ms"], in_process["p50_ms"])
    result = {
        "in_process_one_image": in_process,
        "clients": levels,
        "served_over_in_process_p50": over,
        "setup": {
            "model_uri": model_uri,
            "seconds_per_level": bench.settings.serve_seconds,
            "request": "one real MRI file (base64 JSON) per request, hold-out files in turn",
            "server_workers": os.environ.get("MLFLOW_MODELS_WORKERS", f"default ({os.cpu_count()}, the CPU count)"),
        },
        "targets": [
            target(f"p50 at {bench.settings.clients[0]} client <= 2x in-process pyfunc predict of one image", over, 2.0, at_least=False)
        ],
    }
    for n, level in levels.items():
        print(
            f"part 5: {n:>2} clients: p50 {level['p50_ms']:.1f} ms, p95 {level['p95_ms']:.1f} ms, "
            f"{level['requests_per_s']:.1f} req/s, {level['errors']:.0f} errors"
        )
    print(f"part 5: served p50 / in-process p50 = {over:.2f}x (in-process {in_process['p50_ms']:.1f} ms)")
    return result
