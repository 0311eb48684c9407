"""ModelSpec: everything downstream needs to know about a decoder-only model, and nothing Hugging Face specific.

Weights are keyed by *role*, not by a checkpoint's names:
    embed, final_norm, lm_head (absent when tied),
    layers.{i}.{attn_norm, q, k, v, o, q_bias, k_bias, v_bias, o_bias, ffn_norm, gate, up, down}
Linear weights keep the [out_features, in_features] layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

SPEC_VERSION = 1

ATTENTION_ROLES = ("attn_norm", "q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias")
FFN_ROLES = ("ffn_norm", "gate", "up", "down", "gate_bias", "up_bias", "down_bias")


@dataclass(frozen=True)
class ModelSpec:
    family: str  # loader family that produced this spec (e.g. "llama", "qwen2"); informational only
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear"|"llama3", ...params}; None = plain RoPE
    tie_word_embeddings: bool = False
    activation: str = "silu"  # gated FFN: down(act(gate(x)) * up(x))
    attention_windows: tuple[int | None, ...] = ()  # per layer: sliding window size, None = full attention
    name: str = ""  # human-readable source name, not part of the fingerprint

    def __post_init__(self) -> None:
        if not self.attention_windows:
            object.__setattr__(self, "attention_windows", (None,) * self.num_layers)
        if len(self.attention_windows) != self.num_layers:
            raise ValueError("attention_windows must have one entry per layer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @property
    def num_sublayers(self) -> int:
        return 2 * self.num_layers

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attention_windows"] = list(self.attention_windows)
        d["spec_version"] = SPEC_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        version = d.pop("spec_version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise ValueError(f"ModelSpec version {version} is not supported (this adaskip reads {SPEC_VERSION})")
        d["attention_windows"] = tuple(d.get("attention_windows") or ())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelSpec fields: {sorted(unknown)}")
        return cls(**d)

    def kv_bytes_per_token(self, layer_count: int, dtype_bytes: int = 4) -> int:
        """KV-cache bytes one token costs across `layer_count` layers with live attention."""
        return 2 * layer_count * self.num_kv_heads * self.head_dim * dtype_bytes


def layer_role(i: int, role: str) -> str:
    return f"layers.{i}.{role}"


@dataclass
class LoadedModel:
    """A ModelSpec, its weights by role, and where the tokenizer lives."""

    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    tokenizer_dir: str | None = None  # a directory AutoTokenizer can read (None: no tokenizer available)
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"gguf_file": ...}
    source: str = ""
    _fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.spec, self.weights)
        return self._fingerprint


def fingerprint(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> str:
    """Content hash of architecture + weights: the same model gives the same value from any file format."""
    h = hashlib.sha256()
    arch = spec.to_dict()
    arch.pop("name", None)
    h.update(json.dumps(arch, sort_keys=True).encode())
    for role in sorted(weights):
        t = weights[role].detach().contiguous().cpu()
        h.update(f"{role}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()
