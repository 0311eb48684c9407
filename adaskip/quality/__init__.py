"""adaskip-eval: how much quality each skipping method costs at equal budget, on long-context tasks.

tasks.py (prompt generators), metrics.py (scores), compensation.py (stand-ins for skipped sublayers and
quality-aware selection), runner.py (every method x budget x mode through one engine), report.py (tables, plot,
docs), cli.py (adaskip-eval).
"""
