"""adaskip-build: calibrate -> skip plan -> engine directory."""
