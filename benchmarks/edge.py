"""Part 4: TFLite float32 and full-integer INT8 export of the promoted student, beside the Keras student.

The export itself is ``registry.export.export_edge``, which logs the files and figures to the version's run.
"""

from __future__ import annotations

from benchmarks.common import Bench, ratio, target
from pipelines.quantize import REPRESENTATIVE_IMAGES
from registry.export import export_edge


def run(bench: Bench) -> dict:
    print("part 4: edge export")
    exported = export_edge(bench.cfg, bench.version, bench.work / "edge", repeats=bench.settings.latency_repeats)
    formats = exported.results
    speedup = ratio(formats["keras"]["p50_ms"], formats["int8"]["p50_ms"])
    f1_gap = abs(formats["int8"]["f1"] - formats["float32"]["f1"])
    result = {
        "formats": formats,
        "keras_over_int8_batch1_p50": speedup,
        "keras_over_float32_batch1_p50": ratio(formats["keras"]["p50_ms"], formats["float32"]["p50_ms"]),
        "int8_vs_float32_f1_gap": f1_gap,
        "logged_to_run": exported.run_id,
        "setup": {
            "version": exported.version,
            "representative_images": f"up to {REPRESENTATIVE_IMAGES} training-split images, evenly spread",
            "interpreter_threads": "os.cpu_count()",
        },
        "targets": [
            target("INT8 batch-1 latency >= 3x lower than the Keras student's (p50)", speedup, 3.0),
            target("INT8 hold-out F1 within 0.01 of float32", f1_gap, 0.01, at_least=False),
        ],
    }
    print(f"part 4: Keras / INT8 batch-1 p50 {speedup:.2f}x; F1 float32 {formats['float32']['f1']:.4f} vs INT8 {formats['int8']['f1']:.4f}")
    return result
