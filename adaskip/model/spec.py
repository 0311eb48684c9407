"""ModelSpec: everything downstream needs to know about a decoder-only model, and nothing Hugging Face specific.

Weights are keyed by *role*, not by a checkpoint's names:
    embed, final_norm, lm_head (absent when tied),
    layers.{i}.{attn_norm, q, k, v, o, q_bias, k_bias, v_bias, o_bias, ffn_norm, gate, up, down}
    layers.{i}.{q_norm, k_norm}              [head_dim], when spec.qk_norm
    layers.{i}.{attn_post_norm, ffn_post_norm} [hidden], when spec.post_norms
Linear weights keep the [out_features, in_features] layout. Every norm is a plain RMSNorm, y = w * x / rms(x):
loaders fold conventions such as Gemma's (1 + w) into the stored weight.

A sublayer is f(h) = post_norm(block(norm(h))) (post_norm only with spec.post_norms), and h' = h + f(h): the
residual stream around the whole sublayer is what AdaSkip measures and skips, whatever the block's inside.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

SPEC_VERSION = 2  # the newest version this adaskip reads and writes

ATTENTION_ROLES = ("attn_norm", "q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm",
                   "attn_post_norm")
FFN_ROLES = ("ffn_norm", "gate", "up", "down", "gate_bias", "up_bias", "down_bias", "ffn_post_norm")
ACTIVATIONS = ("silu", "gelu_tanh")  # gated FFN activation: SiLU, or GELU with the tanh approximation

# Fields added in spec version 2, with the value that means "as in version 1". A spec that leaves them all at these
# values (and uses a version-1 activation) is written as version 1, byte for byte as before: fingerprints of
# existing models and engine dirs stay valid, and older adaskip versions still read those engine dirs.
V2_DEFAULTS: dict[str, Any] = {"embed_scale": 1.0, "attn_scale": None, "qk_norm": False, "post_norms": False,
                               "local_rope_theta": None, "local_rope_scaling": None}


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
    # -- version 2 (Gemma 3); see V2_DEFAULTS ------------------------------------------------------------------------
    embed_scale: float = 1.0  # token embeddings are multiplied by this, in the model dtype (Gemma: sqrt(hidden))
    attn_scale: float | None = None  # attention score scale; None = head_dim ** -0.5
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (roles q_norm, k_norm)
    post_norms: bool = False  # sandwich norms: RMSNorm of each block's output before the residual add
    local_rope_theta: float | None = None  # RoPE base of the sliding-window layers; None = the same RoPE as the rest
    local_rope_scaling: dict[str, Any] | None = None  # their RoPE scaling (only with local_rope_theta)
    name: str = ""  # human-readable source name, not part of the fingerprint

    def __post_init__(self) -> None:
        if not self.attention_windows:
            object.__setattr__(self, "attention_windows", (None,) * self.num_layers)
        if len(self.attention_windows) != self.num_layers:
            raise ValueError("attention_windows must have one entry per layer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if self.local_rope_scaling is not None and self.local_rope_theta is None:
            raise ValueError("local_rope_scaling needs local_rope_theta")

    @property
    def num_sublayers(self) -> int:
        return 2 * self.num_layers

    @property
    def version(self) -> int:
        """The oldest spec version that can express this model (see V2_DEFAULTS)."""
        v1 = self.activation == "silu" and all(getattr(self, k) == v for k, v in V2_DEFAULTS.items())
        return 1 if v1 else 2

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attention_windows"] = list(self.attention_windows)
        d["spec_version"] = self.version
        if d["spec_version"] == 1:
            for key in V2_DEFAULTS:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        version = d.pop("spec_version", 1)
        if version not in range(1, SPEC_VERSION + 1):
            raise ValueError(f"ModelSpec version {version} is not supported (this adaskip reads versions 1 to "
                             f"{SPEC_VERSION}); upgrade adaskip")
        d["attention_windows"] = tuple(d.get("attention_windows") or ())
        names = {f.name for f in dataclasses.fields(cls)} - (set(V2_DEFAULTS) if version == 1 else set())
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelSpec fields for spec version {version}: {sorted(unknown)}")
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
