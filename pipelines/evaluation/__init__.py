"""Evaluation: metrics and logits (metrics), calibration (calibration), statistics (statistics), latency (latency) and
the registry-free part of external validation (external)."""
