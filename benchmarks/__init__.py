"""Benchmarks: the student's size and speed and the search's cost, measured side by side in one run.

``python -m benchmarks`` (``make bench``) runs every part on the real MRI set in its own temporary MLflow
store and Optuna database, writes ``benchmarks/results/<date>.json`` and renders ``BENCHMARKS.md`` from it;
``--smoke`` (``make bench-smoke``) runs the same code on a tiny subset.
"""
