"""Evaluation: quality at equal budget (tasks.py, metrics.py, runner.py, report.py: adaskip-eval), speed (bench.py:
adaskip-bench) and backend parity against the reference torch engine (verify.py: adaskip-verify)."""
