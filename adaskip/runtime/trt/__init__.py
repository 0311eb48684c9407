"""The `tensorrt` runtime backend (needs an NVIDIA GPU to run; the build side is adaskip/export/tensorrt/).

    lib.py       find and load TensorRT (`tensorrt`, else TensorRT for RTX) with what its ONNX parser needs
    plugin.py    the IOSimilarity plugin (class-based IPluginV3) and its creator
    profiles.py  optimization profiles from --max-batch-size / --max-input-len / --max-seq-len
    engine.py    the engine behind the Engine protocol
"""
