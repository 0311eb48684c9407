"""Rotary position embedding frequencies from a ModelSpec (plain, linear and Llama-3 scaling).

A model may use two RoPEs: its sliding-window layers their own base (Gemma 3: 10k local, 1M global). Engines ask
`uses_local_rope(spec, i)` per layer and keep one cos/sin table per RoPE.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from adaskip.model.spec import ModelSpec

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def parse_rope_parameters(params: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """A Hugging Face rope_parameters dict -> (theta, scaling for ModelSpec). Raises ValueError for RoPE types we
    do not implement."""
    theta = float(params.get("rope_theta", default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    scaling: dict[str, Any] = {"type": rope_type, "factor": float(params["factor"])}
    if rope_type == "llama3":
        scaling.update(
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    return theta, scaling


def uses_local_rope(spec: ModelSpec, layer: int) -> bool:
    """Whether layer `layer` rotates with the local (sliding-window) RoPE rather than the global one."""
    return spec.local_rope_theta is not None and spec.attention_windows[layer] is not None


def inv_frequencies(spec: ModelSpec, local: bool = False) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies of the global RoPE (or the local one), with its scaling."""
    if local and spec.local_rope_theta is not None:
        return _inv_frequencies(spec.head_dim, spec.local_rope_theta, spec.local_rope_scaling)
    return _inv_frequencies(spec.head_dim, spec.rope_theta, spec.rope_scaling)


def _inv_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is None:
        return inv
    if scaling["type"] == "linear":
        return inv / scaling["factor"]
    if scaling["type"] == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unknown rope scaling {scaling['type']!r}")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, head_dim] (float32), in the rotate-half layout."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [B, T, head_dim]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
