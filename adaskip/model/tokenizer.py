"""A loaded model's tokenizer and its end-of-sequence ids (the tokenizer files found next to the weights)."""

from __future__ import annotations

from typing import Any

from adaskip.errors import ModelLoadError
from adaskip.model.spec import LoadedModel


def load_tokenizer(model: LoadedModel) -> Any:
    from transformers import AutoTokenizer

    if model.tokenizer_dir is None:
        raise ModelLoadError(f"{model.source}: no tokenizer files found next to the model")
    return AutoTokenizer.from_pretrained(model.tokenizer_dir, **model.tokenizer_kwargs)


def eos_token_ids(model: LoadedModel, tokenizer: Any) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model.tokenizer_dir, **model.tokenizer_kwargs).eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    except (OSError, ValueError):
        pass
    return sorted(ids)
