"""Tokenizers from local files only, never with code: a model's (the files next to its weights) or an engine's.

transformers runs a directory's own Python for a tokenizer whose config has an `auto_map` (it asks "run the custom
code? [y/N]" on a terminal). adaskip never does: every load passes trust_remote_code=False, and a directory that
asks for custom code is refused in one line, so neither the build nor an engine dir can carry or run it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adaskip.errors import ModelLoadError
from adaskip.model.spec import LoadedModel

_CONFIGS = ("tokenizer_config.json", "config.json")  # where transformers looks for an auto_map


def refuse_remote_code(directory: str | Path) -> None:
    """Raise ModelLoadError when `directory` asks transformers for its own Python code (an `auto_map`)."""
    root = Path(directory)
    for name in _CONFIGS:
        path = root / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable: transformers reports it when it loads the file
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        # a tokenizer config's auto_map is always the tokenizer's; a model config's matters for AutoTokenizer only
        if auto_map and (name == "tokenizer_config.json" or (isinstance(auto_map, dict) and "AutoTokenizer" in auto_map)):
            raise ModelLoadError(f"{path} maps classes to custom Python code (auto_map); adaskip never runs code "
                                 f"from a model or engine directory (trust_remote_code is always off)")


def open_tokenizer(directory: str | Path, **kwargs: Any) -> Any:
    """AutoTokenizer for local `directory`, refused if it asks for custom code; errors become ModelLoadError."""
    from transformers import AutoTokenizer

    refuse_remote_code(directory)
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ModelLoadError(f"{directory}: the tokenizer cannot be loaded: {e}") from None


def load_tokenizer(model: LoadedModel) -> Any:
    if model.tokenizer_dir is None:
        raise ModelLoadError(f"{model.source}: no tokenizer files found next to the model")
    return open_tokenizer(model.tokenizer_dir, **model.tokenizer_kwargs)


def eos_token_ids(model: LoadedModel, tokenizer: Any) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model.tokenizer_dir, local_files_only=True,
                                               **model.tokenizer_kwargs).eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    except (OSError, ValueError):
        pass
    return sorted(ids)
