"""Hugging Face Llama-style checkpoints (Llama, Mistral, Qwen2): config -> ModelSpec, role -> weight name.

The three share one weight naming; their differences are data in the spec (q/k/v biases, sliding windows,
rope scaling), never branches downstream.
"""

from __future__ import annotations

from typing import Any

from adaskip.errors import ModelLoadError
from adaskip.model.rope import parse_rope_parameters
from adaskip.model.spec import ModelSpec, layer_role

LAYER_NAMES = {  # role -> name inside model.layers.<i>; other families override entries
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "ffn_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "gate_bias": "mlp.gate_proj.bias",
    "up_bias": "mlp.up_proj.bias",
    "down_bias": "mlp.down_proj.bias",
}


def _rope(config: Any) -> tuple[float, dict[str, Any] | None]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    try:
        return parse_rope_parameters(params, getattr(config, "rope_theta", 10000.0))
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def _windows(config: Any, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window:
        return (None,) * num_layers
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (int(window),) * num_layers


def spec_from_config(config: Any, name: str = "") -> ModelSpec:
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelLoadError(f"activation {act!r} is not supported for {config.model_type} (supported: silu)")
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        raise ModelLoadError("pretraining_tp > 1 checkpoints are not supported")
    theta, scaling = _rope(config)
    return ModelSpec(
        **shape_fields(config),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        activation="silu",
        attention_windows=_windows(config, int(config.num_hidden_layers)),
        name=name,
    )


def shape_fields(config: Any) -> dict[str, Any]:
    """The ModelSpec fields every Hugging Face decoder config spells the same way (sizes, heads, eps)."""
    heads = int(config.num_attention_heads)
    return dict(
        family=config.model_type,
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        intermediate_size=int(config.intermediate_size),
        vocab_size=int(config.vocab_size),
        max_position_embeddings=int(config.max_position_embeddings),
        norm_eps=float(config.rms_norm_eps),
    )


def weight_names(spec: ModelSpec, layer_names: dict[str, str] = LAYER_NAMES) -> dict[str, str]:
    """role -> checkpoint name. Optional roles (biases, lm_head when tied) are looked up but may be absent."""
    names = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
    for i in range(spec.num_layers):
        for role, suffix in layer_names.items():
            names[layer_role(i, role)] = f"model.layers.{i}.{suffix}"
    return names


REQUIRED_LAYER_ROLES = ("attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up", "down")
