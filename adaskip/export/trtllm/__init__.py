"""The TensorRT-LLM checkpoint (checkpoint.py), TensorRT-LLM's tensor/pipeline-parallel split rules (parallel.py), the
reader that merges the ranks back (merge.py) and the model class trtllm-build loads with it (model_class.py)."""
