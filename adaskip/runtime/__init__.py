"""Runtime: engines behind one protocol (torch reference, ONNX Runtime graphs, TensorRT), the step loop between
SkipPolicy and an engine, and the Generator on top."""
