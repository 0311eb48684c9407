"""Serving: a Triton Inference Server model repository for an engine dir, and a launcher for the bundled server."""
