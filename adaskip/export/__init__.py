"""Exporters: the ONNX graph (ONNX Runtime, TensorRT's ONNX parser)."""
