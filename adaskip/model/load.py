"""Resolve a model source (built-in name, HF directory, .gguf file, hub id from the local cache) and load it.

Only the loader reads Hugging Face config keys; everything downstream sees a ModelSpec and role-named weights.
Remote code is never executed: an architecture we do not map is refused with the list of supported ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from adaskip.errors import AdaskipError, ModelLoadError, check_choice, did_you_mean
from adaskip.model import builtin, families
from adaskip.model.spec import LoadedModel, ModelSpec, layer_role

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = tuple(_DTYPES)  # the weight dtypes a model loads in (adaskip-build --dtype)


def check_dtype(dtype: str, what: str = "--dtype", error: type[AdaskipError] = ModelLoadError) -> None:
    check_choice(dtype, DTYPES, what, error)


def load_model(source: str, dtype: str = "float32") -> LoadedModel:
    """Load `source`: a built-in name (see `builtin.BUILTIN_MODELS`), an HF model directory, a `.gguf` file, or a
    hub id already in the local Hugging Face cache (never downloaded)."""
    check_dtype(dtype, "dtype")
    torch_dtype = _DTYPES[dtype]
    if source in builtin.BUILTIN_MODELS:
        return _load_hf_dir(builtin.ensure_builtin(source), torch_dtype, name=source)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{source}: a model file must be a .gguf file (or pass a Hugging Face model directory)")
        return load_gguf(path, torch_dtype)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_hf_dir(path, torch_dtype, name=path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], torch_dtype)
        raise ModelLoadError(f"{source}: directory has no config.json" +
                             (f" and {len(ggufs)} .gguf files (pass one of them)" if ggufs else " and no .gguf file"))
    if _looks_like_hub_id(source):
        return _load_hf_dir(_resolve_hub_cache(source), torch_dtype, name=source)
    raise ModelLoadError(
        f"model {source!r} not found{did_you_mean(source, tuple(builtin.BUILTIN_MODELS))}: pass a Hugging Face model "
        f"directory, a .gguf file, a hub id already in the local cache, or a built-in name "
        f"({', '.join(builtin.BUILTIN_MODELS)})")


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _resolve_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as e:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise ModelLoadError(
            f"hub model {repo_id!r} is not in the local Hugging Face cache ({cache}); adaskip never downloads from the "
            f"hub: download it first or pass its local directory") from e


def _family(model_type: str | None, where: str, config: dict[str, Any] | None = None):
    fam = families.family_for(model_type)
    if fam is None:
        remote = " (it needs trust_remote_code, which adaskip never turns on)" if config and config.get("auto_map") else ""
        raise ModelLoadError(
            f"{where}: architecture {model_type!r} is not supported{remote}; supported: {families.supported_summary()}")
    return fam


def _read_hf_config(path: Path) -> Any:
    from transformers import CONFIG_MAPPING

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}/config.json is unreadable: {e}") from e
    model_type = raw.get("model_type")
    _family(model_type, str(path), raw)
    # The config class of a built-in architecture: never the repository's own code (auto_map is ignored).
    return CONFIG_MAPPING[model_type].from_pretrained(str(path), trust_remote_code=False)


def _load_hf_dir(path: Path, dtype: torch.dtype, name: str) -> LoadedModel:
    config = _read_hf_config(path)
    fam = families.family_for(config.model_type)
    spec = fam.spec_from_config(config, name=name)
    tensors = _read_checkpoint(path)
    weights = _map_weights(spec, fam, tensors, dtype, str(path))
    return LoadedModel(spec=spec, weights=weights, tokenizer_dir=str(path) if _has_tokenizer(path) else None,
                       source=str(path))


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        out: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                out.update(load_file(str(f)))
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ModelLoadError(f"{f} is not a readable safetensors file: {e}") from e
        return out
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        out = {}
        for f in bins:
            try:
                out.update(torch.load(str(f), map_location="cpu", weights_only=True))
            except Exception as e:  # pickle and zip errors of a corrupt file
                raise ModelLoadError(f"{f} is not a readable PyTorch checkpoint: {e}") from e
        return out
    raise ModelLoadError(f"{path}: no weights (*.safetensors or pytorch_model*.bin) found")


def _map_weights(spec: ModelSpec, fam: Any, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 where: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> role-named weights of `dtype`, shapes checked against the spec. A family's
    NORM_WEIGHT_OFFSET is added to every norm weight in float32 before the cast (Gemma's (1 + w) becomes a plain
    RMSNorm weight; in fp32 this is exactly what Gemma computes)."""
    names = fam.weight_names(spec)
    norm_offset = float(getattr(fam, "NORM_WEIGHT_OFFSET", 0.0))
    required = {"embed", "final_norm"} | {layer_role(i, r) for i in range(spec.num_layers)
                                          for r in fam.REQUIRED_LAYER_ROLES}
    if not spec.tie_word_embeddings:
        required.add("lm_head")
    weights: dict[str, torch.Tensor] = {}
    missing = []
    for role, hf_name in names.items():
        t = tensors.get(hf_name)
        if t is None:
            if role in required:
                missing.append(hf_name)
            continue
        if role == "lm_head" and spec.tie_word_embeddings:
            continue
        want = _expected_shape(spec, role)
        if tuple(t.shape) != want:
            raise ModelLoadError(f"{where}: {hf_name} has shape {tuple(t.shape)}, the config implies {want}")
        if norm_offset and role.endswith("norm"):
            t = t.float() + norm_offset
        weights[role] = t.to(dtype).contiguous()
    if missing:
        raise ModelLoadError(f"{where}: checkpoint lacks {len(missing)} required weights, e.g. {missing[:3]}")
    return weights


def _expected_shape(spec: ModelSpec, role: str) -> tuple[int, ...]:
    d, q, kv, inter = (spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim,
                       spec.intermediate_size)
    name = role.rsplit(".", 1)[-1]
    shapes = {"embed": (spec.vocab_size, d), "lm_head": (spec.vocab_size, d), "final_norm": (d,),
              "attn_norm": (d,), "ffn_norm": (d,), "q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q),
              "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,), "o_bias": (d,), "gate": (inter, d), "up": (inter, d),
              "down": (d, inter), "gate_bias": (inter,), "up_bias": (inter,), "down_bias": (d,),
              "q_norm": (spec.head_dim,), "k_norm": (spec.head_dim,), "attn_post_norm": (d,), "ffn_post_norm": (d,)}
    return shapes[name]


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A single .gguf file, dequantized by transformers' GGUF reader."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable GGUF model for transformers: {e}") from e
    fam = _family(config.model_type, str(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     trust_remote_code=False)
    except Exception as e:  # the GGUF reader raises a variety of errors for damaged files
        raise ModelLoadError(f"{path}: transformers could not read the GGUF weights: {e}") from e
    spec = fam.spec_from_config(model.config, name=path.stem)
    weights = _map_weights(spec, fam, model.state_dict(), dtype, str(path))
    return LoadedModel(spec=spec, weights=weights, tokenizer_dir=str(path.parent),
                       tokenizer_kwargs={"gguf_file": path.name}, source=str(path))
