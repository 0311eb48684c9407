"""Calibration: the offline importance pass (importance.py) over a corpus (corpus.py), and the stand-ins fitted on
the same pass plus quality-aware selection (compensation.py)."""
