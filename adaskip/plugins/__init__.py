"""The IOSimilarity op: its ONNX function body (any ONNX runtime) and, later, backend plugins."""
