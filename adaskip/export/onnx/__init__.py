"""The ONNX graph: one skeleton over ModelSpec + SkipLayout, one lowering per graph variant, the IOSimilarity op,
int4 quantization and saving."""
