"""Tracking: MLflow runs and their reuse (runs), file locks (locks) and the machine description (machine)."""
