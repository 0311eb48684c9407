"""The building blocks both graph variants share: the model's weights as initializers (each registered once),
RMSNorm, linear layers (fused where they read the same input), the gated FFN's activation, the RoPE tables, and the
batch / token dimensions of the forward. Architecture quirks come from the ModelSpec as data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from adaskip.export.onnx.nodes import Graph
from adaskip.model.rope import inv_frequencies, rope_cos_sin, uses_local_rope
from adaskip.model.spec import ModelSpec


@dataclass(frozen=True)
class Dims:
    """The forward's sizes as [1] int64 tensors of the main graph."""
    batch: str
    tokens: str


class Ops:
    def __init__(self, g: Graph, spec: ModelSpec, weights: dict[str, torch.Tensor]):
        self.g, self.spec, self.w = g, spec, weights
        self._added: set[str] = set()

    # -- initializers ------------------------------------------------------------------------------------------------
    def tensor(self, name: str, make: Callable[[], torch.Tensor | np.ndarray]) -> str:
        """Register the initializer `name` (made by `make`) once and return its name."""
        if name not in self._added:
            self.g.weight(name, make())
            self._added.add(name)
        return name

    def weight(self, role: str, transpose: bool = False) -> str:
        """A model weight by role (linear weights transposed to [in, out] for MatMul)."""
        return self.tensor(f"{role}.T" if transpose else role, lambda: self.w[role].t() if transpose else self.w[role])

    # -- linear layers -----------------------------------------------------------------------------------------------
    def linear(self, g: Graph, x: str, i: int, role: str) -> str:
        y = g.op("MatMul", x, self.weight(f"layers.{i}.{role}", transpose=True))
        if f"layers.{i}.{role}_bias" in self.w:
            y = g.op("Add", y, self.weight(f"layers.{i}.{role}_bias"))
        return y

    def fused_linear(self, g: Graph, x: str, i: int, roles: tuple[str, ...]) -> list[str]:
        """Linear layers reading the same input as one MatMul (q/k/v, gate/up), split afterwards: fewer, larger
        matrix products, which matters in decode where each is a matrix-vector product."""
        parts = [self.w[f"layers.{i}.{r}"].shape[0] for r in roles]
        return g.op("Split", self.fused_matmul(g, x, i, roles), g.const(parts), axis=-1, n_out=len(roles))

    def fused_matmul(self, g: Graph, x: str, i: int, roles: tuple[str, ...]) -> str:
        """The concatenated product of fused_linear, unsplit (GroupQueryAttention takes packed q/k/v)."""
        name = f"layers.{i}.{'+'.join(roles)}"
        parts = [self.w[f"layers.{i}.{r}"] for r in roles]
        biases = [f"layers.{i}.{r}_bias" for r in roles]
        has_bias = any(b in self.w for b in biases)
        self.tensor(name + ".T", lambda: torch.cat(parts, dim=0).t())
        if has_bias:
            self.tensor(name + ".bias", lambda: torch.cat([self.w[b] if b in self.w else torch.zeros(p.shape[0])
                                                           for b, p in zip(biases, parts)]))
        y = g.op("MatMul", x, name + ".T")
        return g.op("Add", y, name + ".bias") if has_bias else y

    # -- norms -------------------------------------------------------------------------------------------------------
    def norm(self, g: Graph, x: str, weight_role: str) -> str:
        # the canonical RMSNorm pattern, which ONNX Runtime fuses into one SimplifiedLayerNormalization kernel
        ms = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), axes=[-1], keepdims=1)
        std = g.op("Sqrt", g.op("Add", ms, g.const(self.spec.norm_eps, np.float32)))
        return g.op("Mul", g.op("Div", x, std), self.weight(weight_role))

    def post_norm(self, g: Graph, x: str, i: int, role: str) -> str:
        """The sandwich norm of a block's output (spec.post_norms): part of the sublayer, before the residual add."""
        return self.norm(g, x, f"layers.{i}.{role}") if self.spec.post_norms else x

    def head_norm(self, g: Graph, x: str, i: int, role: str, heads: int) -> str:
        """Per-head RMSNorm (spec.qk_norm) of a [B, T, heads * head_dim] projection."""
        hd = self.spec.head_dim
        normed = self.norm(g, g.op("Reshape", x, g.const([0, 0, heads, hd])), f"layers.{i}.{role}")
        return g.op("Reshape", normed, g.const([0, 0, heads * hd]))

    # -- attention parameters ----------------------------------------------------------------------------------------
    def window(self, i: int) -> int | None:
        """Layer i's sliding window, None where it cannot cut anything off (full attention)."""
        w = self.spec.attention_windows[i]
        return w if w is not None and w < self.spec.max_position_embeddings else None

    @property
    def attn_scale(self) -> float:
        return self.spec.attn_scale if self.spec.attn_scale is not None else 1.0 / math.sqrt(self.spec.head_dim)

    def rope_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin [max_positions, head_dim] per RoPE, by name suffix: the global one (""), and the sliding-window
        layers' own ("_local") where the spec gives them another base."""
        spec = self.spec
        positions = torch.arange(spec.max_position_embeddings)
        tables = {"": rope_cos_sin(inv_frequencies(spec), positions)}
        if any(uses_local_rope(spec, i) for i in range(spec.num_layers)):
            tables["_local"] = rope_cos_sin(inv_frequencies(spec, local=True), positions)
        return tables

    def rope_suffix(self, i: int) -> str:
        return "_local" if uses_local_rope(self.spec, i) else ""


def _gelu_tanh(g: Graph, x: str) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in opset-17 ops (ONNX Runtime fuses it into FastGelu)."""
    cube = g.op("Mul", g.op("Mul", x, x), x)
    inner = g.op("Mul", g.op("Add", x, g.op("Mul", cube, g.const(0.044715, np.float32))),
                 g.const(math.sqrt(2.0 / math.pi), np.float32))
    return g.op("Mul", g.op("Mul", x, g.const(0.5, np.float32)),
                g.op("Add", g.op("Tanh", inner), g.const(1.0, np.float32)))


# the gated FFN's activation by ModelSpec.activation
ACTIVATIONS: dict[str, Callable[[Graph, str], str]] = {
    "silu": lambda g, x: g.op("Mul", x, g.op("Sigmoid", x)),
    "gelu_tanh": _gelu_tanh,
}
