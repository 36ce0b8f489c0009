"""Part 4: TFLite float32 and full-integer INT8 export of the promoted student, beside the Keras student.

INT8 twice: post-training quantized from the float student, and the quantization-aware export the version carries
(promoted with ``qat=true``; it is what ``serving_format=tflite-int8`` serves). The export itself is
``registry.export.export_edge``, which logs the files and figures to the version's run.
"""

from __future__ import annotations

from benchmarks.common import Bench, ratio, target
from pipelines.config import SERVING_F1_TOLERANCE
from pipelines.quantize import REPRESENTATIVE_IMAGES, float_ops
from registry.export import export_edge


def run(bench: Bench) -> dict:
    print("part 4: edge export")
    exported = export_edge(bench.cfg, bench.version, bench.work / "edge", repeats=bench.settings.latency_repeats)
    formats = exported.results
    int8 = "int8_qat" if "int8_qat" in formats else "int8"  # the served INT8
    p50 = {name: values["p50_ms"] for name, values in formats.items()}
    gaps = {name: formats["float32"]["f1"] - formats[name]["f1"] for name in ("int8", "int8_qat") if name in formats}
    over_keras, over_float32 = ratio(p50["keras"], p50[int8]), ratio(p50["float32"], p50[int8])
    result = {
        "formats": formats,
        "float_ops": {name: len(float_ops(path.read_bytes())) for name, path in exported.files.items()},
        "keras_over_int8_batch1_p50": over_keras,
        "float32_over_int8_batch1_p50": over_float32,
        "keras_over_float32_batch1_p50": ratio(p50["keras"], p50["float32"]),
        "float32_minus_int8_f1": gaps,
        "logged_to_run": exported.run_id,
        "setup": {
            "version": exported.version,
            "served_int8": int8,
            "representative_images": f"up to {REPRESENTATIVE_IMAGES} training-split images, evenly spread",
            "student": f"{bench.cfg.student_size} chosen by the search, student_norm={bench.cfg.student_norm}, qat={bench.cfg.qat}",
        },
        "targets": [
            target(f"{int8} batch-1 latency >= 3x lower than the Keras student's (p50)", over_keras, 3.0),
            target(f"{int8} batch-1 latency >= 1.5x lower than TFLite float32 (p50)", over_float32, 1.5),
        ]
        + [
            target(f"{name} hold-out F1 at most {SERVING_F1_TOLERANCE} below float32", gap, SERVING_F1_TOLERANCE, at_least=False)
            for name, gap in gaps.items()
        ],
    }
    print(
        f"part 4: {int8} batch-1 p50 {over_keras:.2f}x faster than Keras, {over_float32:.2f}x than float32; hold-out F1 "
        + ", ".join(f"{name} {values['f1']:.4f}" for name, values in formats.items())
    )
    return result
