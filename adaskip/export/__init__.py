"""Exporters: the ONNX graph (onnx/: ONNX Runtime and TensorRT's parser), the TensorRT engine built from it
(tensorrt/), and the TensorRT-LLM checkpoint (trtllm/)."""
