"""Hugging Face Gemma 3 text checkpoints (Gemma3ForCausalLM, model_type "gemma3_text"): config -> ModelSpec,
role -> weight name.

Gemma's differences from Llama are data in the spec, never branches downstream: embeddings scaled by sqrt(hidden),
sandwich norms (post_norms), per-head q/k RMSNorm (qk_norm), the attention scale query_pre_attn_scalar ** -0.5,
sliding-window layers with their own RoPE base (local_rope_theta), and a GELU-tanh gated FFN. Gemma's RMSNorm
multiplies by (1 + w): the loader adds NORM_WEIGHT_OFFSET to every norm weight (in float32), so every engine uses
the plain RMSNorm y = w * x / rms(x).

Note the naming: Gemma's `post_attention_layernorm` normalizes the attention *output* (our attn_post_norm); the
FFN's input norm is `pre_feedforward_layernorm` (our ffn_norm).
"""

from __future__ import annotations

from typing import Any

from adaskip.errors import ModelLoadError
from adaskip.model import hf_llama
from adaskip.model.hf_llama import shape_fields
from adaskip.model.rope import parse_rope_parameters
from adaskip.model.spec import ModelSpec

NORM_WEIGHT_OFFSET = 1.0  # Gemma's RMSNorm scales by (1 + w)

_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh"}  # HF name -> ModelSpec name

# Llama's names, plus q/k norms and the sandwich norms (Gemma's post_attention_layernorm is the attention output's
# norm; the FFN's input norm is pre_feedforward_layernorm)
LAYER_NAMES = {**hf_llama.LAYER_NAMES,
               "q_norm": "self_attn.q_norm.weight",
               "k_norm": "self_attn.k_norm.weight",
               "attn_post_norm": "post_attention_layernorm.weight",
               "ffn_norm": "pre_feedforward_layernorm.weight",
               "ffn_post_norm": "post_feedforward_layernorm.weight"}

REQUIRED_LAYER_ROLES = ("attn_norm", "q", "k", "v", "o", "q_norm", "k_norm", "attn_post_norm", "ffn_norm",
                        "ffn_post_norm", "gate", "up", "down")


def _refuse_unsupported(config: Any) -> None:
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None) is not None:
            raise ModelLoadError(f"Gemma {key}={getattr(config, key)} is not supported (Gemma 2 style logit "
                                 f"soft-capping; Gemma 3 does not use it)")
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelLoadError("Gemma with use_bidirectional_attention (an encoder) is not supported: adaskip runs "
                             "causal decoders")
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in _ACTIVATIONS:
        raise ModelLoadError(f"activation {act!r} is not supported for gemma3_text (supported: "
                             f"{', '.join(_ACTIVATIONS)})")


def _layer_ropes(config: Any) -> tuple[tuple[float, dict | None], tuple[float, dict | None]]:
    """(global, local) RoPE as (theta, scaling): transformers 5 keeps one rope_parameters entry per layer type."""
    params = getattr(config, "rope_parameters", None) or {}
    try:
        full = parse_rope_parameters(params.get("full_attention") or {}, 1_000_000.0)
        local = parse_rope_parameters(params.get("sliding_attention") or {}, 10_000.0)
    except ValueError as e:
        raise ModelLoadError(f"gemma3_text: {e}") from None
    return full, local


def spec_from_config(config: Any, name: str = "") -> ModelSpec:
    _refuse_unsupported(config)
    num_layers = int(config.num_hidden_layers)
    layer_types = list(config.layer_types)
    if len(layer_types) != num_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise ModelLoadError(f"gemma3_text: layer_types {layer_types} do not give one of sliding_attention / "
                             f"full_attention per layer")
    window = getattr(config, "sliding_window", None)
    sliding = [t == "sliding_attention" for t in layer_types]
    if any(sliding) and not window:
        raise ModelLoadError("gemma3_text: sliding_attention layers without a sliding_window are not supported")
    (theta, scaling), (local_theta, local_scaling) = _layer_ropes(config)
    has_local = any(sliding) and (local_theta, local_scaling) != (theta, scaling)
    return ModelSpec(
        **shape_fields(config),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        activation=_ACTIVATIONS[getattr(config, "hidden_activation", None) or config.hidden_act],
        attention_windows=tuple(int(window) if s else None for s in sliding),
        embed_scale=float(config.hidden_size) ** 0.5,
        attn_scale=float(config.query_pre_attn_scalar) ** -0.5,
        qk_norm=True,
        post_norms=True,
        local_rope_theta=local_theta if has_local else None,
        local_rope_scaling=local_scaling if has_local else None,
        name=name,
    )


def weight_names(spec: ModelSpec) -> dict[str, str]:
    """role -> checkpoint name. Optional roles (biases, lm_head when tied) are looked up but may be absent."""
    return hf_llama.weight_names(spec, LAYER_NAMES)
