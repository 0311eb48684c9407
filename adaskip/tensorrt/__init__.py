"""TensorRT backend: the portable ONNX graph -> a serialized TensorRT engine, and the runtime that executes it.

    lib.py       find and load TensorRT (`tensorrt`, else TensorRT for RTX) with what its ONNX parser needs
    plugin.py    the IOSimilarity plugin (class-based IPluginV3) and its creator
    profiles.py  optimization profiles from --max-batch-size / --max-input-len / --max-seq-len
    progress.py  build progress display (an IProgressMonitor)
    network.py   parse the ONNX graph into a TensorRT network and describe what it contains
    builder.py   build and write the engine (adaskip-build --backend tensorrt)
    cli_args.py  adaskip-build's flags for it
    engine.py    the `tensorrt` runtime backend behind the Engine protocol (needs an NVIDIA GPU)
"""
