"""Calibration prompts: the built-in corpus or a user file, cut into N prompts of T tokens.

Built-in corpus: the Python Language Reference topics that every CPython installation ships in `pydoc_data`
(~465 kB of real English technical prose, PSF License) — freely licensed, needs no download, and is identical on
every machine, so a calibration is reproducible. For a deployment, calibrate on text like the traffic it will see
(`--calib FILE`). The reference code calibrates on one fixed data set whatever the task: 20 LongBench qasper
prompts as warm-up in every experiment, whose evaluated tasks are other LongBench sets. `adaskip-eval`'s
`task-calib` ablation compares calibrating on the task's own prompts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaskip.errors import InputError, check_choice

BUILTIN = "builtin:python-reference"
_TEXT_KEYS = ("text", "context", "input", "prompt", "document", "article")


# auto: the unskipped `ort` graph on ONNX Runtime where the model allows it, else the reference torch engine
CALIBRATION_ENGINES = ("auto", "ort", "torch")


@dataclass
class CalibrationOptions:
    """What to calibrate on (adaskip-build's --calib, --calib-prompts, --calib-tokens)."""
    data: str | None = None  # a .jsonl (one prompt per record) or text file; None: the built-in corpus
    prompts: int = 20  # N
    tokens: int = 2048  # T tokens per prompt
    engine: str = "auto"  # which engine runs the pass (CALIBRATION_ENGINES)
    cache: bool = True  # reuse a finished calibration of the same model and prompts (adaskip/calibrate/importance.py)
    reuse: str | None = None  # take the statistics stored in an earlier plan.json instead of a pass

    def validate(self) -> None:
        """The sizes and choices (the files are checked when they are read)."""
        check_choice(self.engine, CALIBRATION_ENGINES, "--calib-engine")
        if self.reuse is not None and self.data is not None:
            raise InputError("--calibration reuses an earlier plan's statistics; drop --calib (or --calibration)")
        if self.prompts < 1:
            raise InputError(f"--calib-prompts must be at least 1; got {self.prompts}")
        if self.tokens < 8:
            raise InputError(f"--calib-tokens must be at least 8; got {self.tokens}")


@dataclass
class CalibrationSet:
    prompts: list[list[int]]
    source: str
    digest: str  # sha256 over the token ids actually used


def builtin_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"calibration file {path} is not UTF-8 text") from None


def _records_from_jsonl(path: Path) -> list[str]:
    records = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(obj, str):
            records.append(obj)
        elif isinstance(obj, dict) and any(isinstance(obj.get(k), str) for k in _TEXT_KEYS):
            records.append("\n\n".join(obj[k] for k in _TEXT_KEYS if isinstance(obj.get(k), str)))
        else:
            raise InputError(f"{path}:{n}: expected a JSON string or an object with one of {_TEXT_KEYS}")
    return records


def load_calibration(tokenizer: Any, num_prompts: int, prompt_tokens: int, path: str | None = None) -> CalibrationSet:
    """N prompts of `prompt_tokens` tokens: one per jsonl record (records over T are cut), or consecutive windows
    of one long text (a .txt file or the built-in corpus)."""
    CalibrationOptions(path, num_prompts, prompt_tokens).validate()
    prefix = leading_special_tokens(tokenizer)
    body_tokens = prompt_tokens - len(prefix)
    if path is None:
        prompts = _windows(tokenizer.encode(builtin_text(), add_special_tokens=False), num_prompts, body_tokens,
                           BUILTIN)
        source = BUILTIN
    else:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"calibration file {path} does not exist")
        if p.suffix in (".jsonl", ".json"):
            records = _records_from_jsonl(p)
            if len(records) < num_prompts:
                raise InputError(f"{path} has {len(records)} records; {num_prompts} calibration prompts requested "
                                 f"(lower --calib-prompts)")
            prompts = [tokenizer.encode(r, add_special_tokens=False)[:body_tokens] for r in records[:num_prompts]]
            prompts = [ids for ids in prompts if ids]
            if len(prompts) < num_prompts:
                raise InputError(f"{path}: some of the first {num_prompts} records are empty")
        else:
            text = _read_text(p)
            prompts = _windows(tokenizer.encode(text, add_special_tokens=False), num_prompts, body_tokens, path)
        source = f"file:{p.name}"
    prompts = [prefix + ids for ids in prompts]
    h = hashlib.sha256()
    for ids in prompts:
        h.update(json.dumps(ids).encode())
    return CalibrationSet(prompts=prompts, source=source, digest="sha256:" + h.hexdigest())


def load_heldout(tokenizer: Any, calibration: CalibrationOptions, count: int, tokens: int) -> CalibrationSet:
    """`count` windows of `tokens` tokens from the same source as the calibration prompts of `calibration`, disjoint
    from them: a text's windows after the calibration windows, a .jsonl's records after the calibration records
    (what a quality bound is measured on, so the selection is not judged on its own calibration text)."""
    prefix = leading_special_tokens(tokenizer)
    body, calib_body = tokens - len(prefix), calibration.tokens - len(prefix)
    path = calibration.data
    where = BUILTIN if path is None else path
    if path is not None and Path(path).suffix in (".jsonl", ".json"):
        records = _records_from_jsonl(Path(path))[calibration.prompts:calibration.prompts + count]
        prompts = [ids for ids in (tokenizer.encode(r, add_special_tokens=False)[:body] for r in records) if ids]
        if len(prompts) < count:
            raise InputError(f"{path}: a held-out slice needs {count} non-empty records after the "
                             f"{calibration.prompts} calibration records")
    else:
        text = builtin_text() if path is None else _read_text(Path(path))
        ids = tokenizer.encode(text, add_special_tokens=False)[calibration.prompts * calib_body:]
        if len(ids) < count * body:
            raise InputError(f"{where}: a held-out slice of {count} x {tokens} tokens after the "
                             f"{calibration.prompts} x {calibration.tokens} calibration tokens needs a longer text "
                             f"(lower --calib-prompts / --calib-tokens)")
        prompts = _windows(ids, count, body, where)
    prompts = [prefix + ids for ids in prompts]
    h = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    return CalibrationSet(prompts=prompts, source=f"held-out:{where}", digest="sha256:" + h)


def leading_special_tokens(tokenizer: Any) -> list[int]:
    """What the tokenizer puts before every prompt (e.g. Llama's BOS): calibration prompts start the same way as
    inference prompts, so first-token (attention-sink) statistics match."""
    with_special = tokenizer.encode("x")
    plain = tokenizer.encode("x", add_special_tokens=False)
    n = len(with_special) - len(plain)
    return with_special[:n] if n > 0 and with_special[n:] == plain else []


def _windows(ids: list[int], n: int, t: int, where: str) -> list[list[int]]:
    if len(ids) < n * t:
        raise InputError(f"{where} has {len(ids)} tokens; {n} prompts x {t} tokens need {n * t} "
                         f"(lower --calib-prompts / --calib-tokens, or pass a longer --calib file)")
    return [ids[i * t:(i + 1) * t] for i in range(n)]
