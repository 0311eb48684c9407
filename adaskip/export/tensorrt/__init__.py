"""The portable ONNX graph -> a serialized TensorRT engine (adaskip-build --backend tensorrt).

    options.py   TensorRTOptions: the --backend tensorrt flags, their defaults and checks
    network.py   parse the ONNX graph into a TensorRT network and describe what it contains
    progress.py  build progress display (an IProgressMonitor)
    builder.py   build and write the engine
The runtime side (loading TensorRT, the IOSimilarity plugin, profiles, the engine) is adaskip/runtime/trt/.
"""
