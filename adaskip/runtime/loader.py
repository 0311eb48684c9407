"""Open an engine directory and assemble engine + policy + tokenizer + Generator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaskip.engine_dir import TOKENIZER, EngineDir, open_engine_dir
from adaskip.policy import SkipPolicy
from adaskip.runtime.generate import Generator
from adaskip.runtime.registry import open_engine


@dataclass
class Runtime:
    engine_dir: EngineDir
    engine: Any
    policy: SkipPolicy
    tokenizer: Any
    generator: Generator


def load_runtime(path: str | Path, threads: int | None = None) -> Runtime:
    from transformers import AutoTokenizer

    ed = open_engine_dir(path)
    engine = open_engine(ed, threads=threads)
    tokenizer = AutoTokenizer.from_pretrained(str(ed.root / TOKENIZER))
    policy = SkipPolicy(ed.plan)
    eos = tuple(ed.manifest.get("tokenizer", {}).get("eos_token_ids", []))
    return Runtime(ed, engine, policy, tokenizer, Generator(engine, policy, tokenizer, eos))
