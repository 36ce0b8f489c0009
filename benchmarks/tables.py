"""How BENCHMARKS.md prints numbers and tables: one format for every figure."""

from __future__ import annotations

import math

COST_LABELS = {
    "teacher_epoch_s": "teacher training epoch",
    "student_kd_epoch_s": "student KD epoch (cached)",
    "student_inference_s": "student inference, all images",
}


def fmt(value) -> str:
    """One number as every table prints it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "\\|")  # a pipe would end a table cell
    if not math.isfinite(value):
        return "n/a"
    if value == int(value):
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def interval(gap: dict) -> str:
    """A paired F1 difference with its 95% bootstrap interval, e.g. ``0.0120 [-0.0050, 0.0290] (1,150 scans)``."""
    return f"{fmt(gap['difference'])} [{fmt(gap['low'])}, {fmt(gap['high'])}] ({fmt(gap['scans'])} scans)"


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
