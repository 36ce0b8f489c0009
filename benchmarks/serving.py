"""Part 5: `mlflow models serve` on the promoted version under 1, 4 and 16 concurrent clients on loopback.

Each client sends one real MRI file per request (the hold-out files in turn) and waits for the answer before
sending the next, for a fixed time per level. The baseline is the same model in-process: ``pyfunc.predict``
of one image file, which includes the same decoding and preprocessing. The HTTP floor is ``GET /ping`` on the same
server by the same client, one at a time: the loopback round trip through uvicorn that any request pays (``WHY``).

``python -m benchmarks.serving [data_dir]`` compares the serving formats (Keras, TFLite float32, TFLite INT8) of one
student on real scans the same way, with 1 and 2 server workers under 16 clients.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from tqdm import tqdm

from benchmarks.common import Bench, ratio, target
from pipelines.evaluation.latency import latency_percentiles, percentiles_ms
from pipelines.names import VersionTag
from registry.model import encode_file
from registry.server import serve_model

WHY = (
    "the served p50 less the HTTP floor (p50 of GET /ping on the same server and client: the loopback round trip through "
    "uvicorn that every request pays, whatever the model) against the in-process p50, no longer the served p50 itself: "
    "the floor is fixed, so as a plain ratio the target got harder the faster the model became, and it asked about "
    "uvicorn rather than what serving this model adds (the request's upload, JSON and base64 parsing, the answer)"
)


def post(port: int, body: bytes | None, path: str = "/invocations") -> float:
    """Seconds for one request (a GET of ``path`` where ``body`` is None); raises on any non-200 answer."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers={"Content-Type": "application/json"})
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


def request_bodies(images: list[str]) -> list[bytes]:
    """One JSON request per base64 image file, as a client sends it."""
    return [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]]}}).encode() for image in images]


def in_process(model_uri: str, images: list[str], repeats: int) -> dict[str, float]:
    """p50/p95 of ``pyfunc.predict`` of one image file (the files in turn), decoding and preprocessing included."""
    local = mlflow.pyfunc.load_model(model_uri)
    frames = [pd.DataFrame({"image": [image]}) for image in images]
    turn = iter(range(10**9))
    return latency_percentiles(lambda: local.predict(frames[next(turn) % len(frames)]), repeats)


def served(
    model_uri: str, tracking_uri: str, bodies: list[bytes], clients: tuple[int, ...], seconds: float, workers: int = 1, pings: int = 100
) -> dict:
    """`mlflow models serve --workers <workers>` under each number of closed-loop ``clients``, ``seconds`` each
    (``levels``), and the p50/p95 of ``pings`` one-at-a-time ``GET /ping`` requests (``ping``: the HTTP floor)."""
    server, port = serve_model(model_uri, tracking_uri, workers=workers)
    try:
        for body in bodies[: 5 * workers]:  # warm-up: every worker has loaded and run its model before timing starts
            post(port, body)
        ping = latency_percentiles(lambda: post(port, None, "/ping"), pings)
        return {
            "levels": {str(n): load(port, bodies, n, seconds) for n in tqdm(clients, desc="serving", unit="level", leave=False)},
            "ping": ping,
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(bench: Bench) -> dict:
    prepared = bench.prepared
    files = prepared.dataset.manifest["path"].to_numpy()[prepared.splits.test]
    images = [encode_file(f) for f in files]
    # The version promote registered (champion, or challenger when its no-KD twin did better: served all the same).
    model_uri = f"models:/{bench.cfg.model_name}/{bench.version}"
    in_process_one = in_process(model_uri, images, bench.settings.latency_repeats)
    # One server worker per core: each runs the model single-threaded (registry.model.serving_threads).
    workers = os.cpu_count() or 1
    print(f"part 5: starting mlflow models serve --workers {workers}")
    measured = served(
        model_uri,
        bench.tracking_uri,
        request_bodies(images),
        bench.settings.clients,
        bench.settings.serve_seconds,
        workers,
        bench.settings.latency_repeats,
    )
    levels, ping = measured["levels"], measured["ping"]
    one, most = levels[str(bench.settings.clients[0])], levels[str(max(bench.settings.clients))]
    over = ratio(one["p50_ms"], in_process_one["p50_ms"])
    above_floor = ratio(one["p50_ms"] - ping["p50_ms"], in_process_one["p50_ms"])
    result = {
        "in_process_one_image": in_process_one,
        "clients": levels,
        "http_floor_ping": ping,
        "served_over_in_process_p50": over,
        "served_above_floor_over_in_process_p50": above_floor,
        "setup": {
            "model_uri": model_uri,
            "seconds_per_level": bench.settings.serve_seconds,
            "request": "one real MRI file (base64 JSON) per request, hold-out files in turn",
            "server_workers": workers,
            "serving_format": MlflowClient().get_model_version(bench.cfg.model_name, bench.version).tags.get(VersionTag.SERVING_FORMAT),
        },
        "targets": [
            target("in-process pyfunc predict of one real scan <= 5 ms (p50)", in_process_one["p50_ms"], 5.0, at_least=False),
            target(
                f"`mlflow models serve`, {max(bench.settings.clients)} clients >= 150 req/s on {os.cpu_count()} cores",
                most["requests_per_s"],
                150.0,
            ),
            target(
                f"p50 at {bench.settings.clients[0]} client less the HTTP floor (GET /ping p50) <= 2x in-process pyfunc predict "
                "of one scan",
                above_floor,
                2.0,
                at_least=False,
                why=WHY,
            ),
        ],
    }
    for n, level in levels.items():
        print(
            f"part 5: {n:>2} clients: p50 {level['p50_ms']:.1f} ms, p95 {level['p95_ms']:.1f} ms, "
            f"{level['requests_per_s']:.1f} req/s, {level['errors']:.0f} errors"
        )
    print(
        f"part 5: served p50 / in-process p50 = {over:.2f}x; less the HTTP floor ({ping['p50_ms']:.2f} ms): {above_floor:.2f}x "
        f"(in-process {in_process_one['p50_ms']:.2f} ms)"
    )
    return result


def compare_serving_formats(data_dir: Path, work: Path, student_size: str = "28x3", image_size: int = 64, seconds: float = 10.0) -> dict:
    """Each serving format of one student on real scans: in-process pyfunc latency of one scan, and `mlflow models serve`
    with 1 and 2 workers under 16 closed-loop clients. The student is untrained: timing, not accuracy, is measured."""
    from pipelines.config import Config
    from pipelines.models.builders import build_student
    from pipelines.steps.prepare import prepare_data
    from registry.export import tflite_exports
    from registry.promote import log_student

    cfg = Config(data_dir=str(data_dir), image_size=image_size, folds=2, cache_dir=str(work / "cache"))
    prepared = prepare_data(cfg)
    student = build_student(student_size, image_size, prepared.dataset.num_classes, seed=0)
    exports = tflite_exports(student, prepared)
    images = [encode_file(f) for f in prepared.dataset.manifest["path"].to_numpy()[prepared.splits.test]]
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    mlflow.set_experiment("serving-formats")
    results = {}
    with mlflow.start_run():
        uris = {
            name: log_student(student, prepared, cfg, pd.DataFrame({"image": images[:1]}), exports, name).model_uri
            for name in ("keras", *exports)
        }
    for name, uri in uris.items():
        results[name] = {"in_process_one_scan": in_process(uri, images, 100)}
        for workers in (1, 2):
            level = served(uri, mlflow.get_tracking_uri(), request_bodies(images), (16,), seconds, workers)["levels"]["16"]
            results[name][f"workers_{workers}_16_clients"] = level
            print(
                f"{name:<15} in-process p50 {results[name]['in_process_one_scan']['p50_ms']:.2f} ms; served, {workers} worker(s), "
                f"16 clients: {level['requests_per_s']:.1f} req/s, p50 {level['p50_ms']:.1f} ms, p95 {level['p95_ms']:.1f} ms, "
                f"{level['errors']:.0f} errors",
                flush=True,
            )
    return results


if __name__ == "__main__":  # python -m benchmarks.serving [data_dir]: the serving formats compared
    import sys
    import tempfile

    from benchmarks.common import REAL_DATA_DIR

    with tempfile.TemporaryDirectory() as tmp:
        compare_serving_formats(Path(sys.argv[1]) if len(sys.argv) > 1 else REAL_DATA_DIR, Path(tmp))
