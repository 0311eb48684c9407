"""Registry of supported architecture families: Hugging Face model_type -> mapping module."""

from __future__ import annotations

from types import ModuleType

from adaskip.model import hf_gemma3, hf_llama

# model_type -> module providing spec_from_config(config, name), weight_names(spec) -> {role: hf_name} and
# REQUIRED_LAYER_ROLES; optionally NORM_WEIGHT_OFFSET (added to every norm weight at load: Gemma's 1 + w)
FAMILIES: dict[str, ModuleType] = {
    "llama": hf_llama,  # Llama 2, Llama 3.x, Vicuna, SmolLM2
    "mistral": hf_llama,
    "qwen2": hf_llama,  # Qwen2 / Qwen2.5
    "gemma3_text": hf_gemma3,  # Gemma 3 text models (Gemma3ForCausalLM: 270M, 1B)
}


def supported_summary() -> str:
    return ("Llama 2/3.x (incl. Vicuna, SmolLM2), Mistral, Qwen2/2.5, Gemma 3 text (model_type: "
            + ", ".join(sorted(FAMILIES)) + ")")


def family_for(model_type: str | None) -> ModuleType | None:
    return FAMILIES.get(model_type or "")
