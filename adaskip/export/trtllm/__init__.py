"""The TensorRT-LLM checkpoint (checkpoint.py) and the model class trtllm-build loads with it (model_class.py)."""
