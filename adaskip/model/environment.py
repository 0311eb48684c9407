"""How adaskip runs the Hugging Face libraries in every process (CLI, Triton stub, scripts): offline, quiet."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # adaskip never reaches the hub
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
