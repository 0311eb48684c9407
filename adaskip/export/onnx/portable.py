"""The portable lowering: attention, KV cache and LM head in standard ONNX ops only, what TensorRT's parser reads
(ONNX Runtime runs it too). It implements adaskip.export.onnx.graph.Lowering.

KV cache without whole-cache copies: the graph reads a caller-owned buffer (`past_key_i` stored transposed as
[B, kv_heads, head_dim, S], `past_value_i` as [B, kv_heads, S, head_dim], validity `past_valid` [B, S]) and returns
only the new tokens' K/V (`new_key_i` [B, kv_heads, head_dim, T], `new_value_i` [B, kv_heads, T, head_dim]); the
runtime writes them into its buffer in place. Attention is computed over the buffer part and the new part separately
and joined in one softmax, with grouped query heads folded into the query rows so K/V are never expanded. Prefill
passes an empty buffer (S = 0). Sliding-window layers (spec.attention_windows) get a banded bias by position.

Every token is computed in every sublayer (no prefill tail: TensorRT's conditionals would need branch outputs of
different shapes), and no If sits inside another If's branch (TensorRT-RTX 1.7's builder fails on nested
conditionals with an internal Myelin CHECK).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from adaskip.export.onnx.nodes import BOOL, FLOAT, INT64, NEG, Graph
from adaskip.export.onnx.ops import Dims, Ops
from adaskip.layout import SkipLayout


class PortableLowering:
    variant = "portable"
    opsets: tuple[onnx.OperatorSetIdProto, ...] = ()
    nested_ifs = False
    tail_start = None

    def __init__(self, ops: Ops, layout: SkipLayout, dims: Dims):
        self.ops, self.spec = ops, ops.spec
        self.cached = set(layout.cached_layers)
        g, spec = ops.g, ops.spec
        tables = ops.rope_tables()
        for suffix, (cos, sin) in tables.items():
            g.weight(f"rope_cos{suffix}", cos)
            g.weight(f"rope_sin{suffix}", sin)
        with g.scope("/attention_inputs"):
            dim_s = g.op("Slice", g.op("Shape", "past_valid"), g.const([1]), g.const([2]), g.const([0]))
            self.dim_t = dims.tokens
            self.dim_st = g.op("Add", dim_s, dims.tokens)  # buffer + new tokens
            self.split_st = g.op("Concat", dim_s, dims.tokens, axis=0)
            self.rope: dict[str, tuple[str, str]] = {  # RoPE suffix -> cos, sin [B, 1, T, hd] at position_ids
                suffix: tuple(g.op("Unsqueeze", g.op("Gather", f"rope_{f}{suffix}", "position_ids"), g.const([1]))
                              for f in ("cos", "sin")) for suffix in tables}
            kv = g.const([spec.num_kv_heads])
            self.shape_new_k = g.op("Concat", dims.batch, kv, g.const([spec.head_dim]), dims.tokens, axis=0)
            self.shape_new_v = g.op("Concat", dims.batch, kv, dims.tokens, g.const([spec.head_dim]), axis=0)
            self.biases = self._attention_biases(dims, dim_s)

    def _attention_biases(self, dims: Dims, dim_s: str) -> dict[int | None, tuple[str, str]]:
        """Window (None: full attention) -> additive attention biases [B, 1, 1, T, S + T] over buffer and new
        tokens, and [B, 1, 1, T, T] over the new tokens alone: buffer slots by validity; new tokens causal + padding
        (+ self)."""
        g = self.ops.g
        t_scalar = g.op("Squeeze", dims.tokens, g.const([0]))
        rng = g.op("Range", g.const(0), t_scalar, g.const(1))
        q_idx = g.op("Unsqueeze", rng, g.const([1]))
        k_idx = g.op("Unsqueeze", rng, g.const([0]))
        allowed = g.op("And", g.op("Not", g.op("Greater", k_idx, q_idx)),
                       g.op("Unsqueeze", "token_valid", g.const([1])))  # [B, T, T]
        allowed = g.op("Or", allowed, g.op("Equal", k_idx, q_idx))
        zero, neg = g.const(0.0, np.float32), g.const(NEG, np.float32)
        bias_new = g.op("Unsqueeze", g.op("Where", allowed, zero, neg), g.const([1, 2]))
        buf = g.op("Unsqueeze", g.op("Where", "past_valid", zero, neg), g.const([1, 2, 3]))  # [B, 1, 1, 1, S]
        buf = g.op("Expand", buf, g.op("Concat", dims.batch, g.const([1, 1]), dims.tokens, dim_s, axis=0))
        biases: dict[int | None, tuple[str, str]] = {None: (g.op("Concat", buf, bias_new, axis=4), bias_new)}
        windows = sorted({self.ops.window(i) for i in range(self.spec.num_layers)} - {None})
        if windows:  # banded: a key at position p is seen from queries at positions < p + window
            q_pos = g.op("Unsqueeze", "position_ids", g.const([2]))  # [B, T, 1]
            # buffer slots hold each row's tokens contiguously from position 0 (left padding is invalid)
            buf_pos = g.op("Sub", g.op("CumSum", g.op("Cast", "past_valid", to=INT64), g.const(1)), g.const(1))
            dist_new = g.op("Sub", q_pos, g.op("Unsqueeze", "position_ids", g.const([1])))  # [B, T, T]
            dist_buf = g.op("Sub", q_pos, g.op("Unsqueeze", buf_pos, g.const([1])))  # [B, T, S]
            valid_buf = g.op("Unsqueeze", "past_valid", g.const([1]))
        for w in windows:
            near_new = g.op("And", allowed, g.op("Less", dist_new, g.const(w)))
            near_buf = g.op("And", valid_buf, g.op("Less", dist_buf, g.const(w)))
            new = g.op("Unsqueeze", g.op("Where", near_new, zero, neg), g.const([1, 2]))
            old = g.op("Unsqueeze", g.op("Where", near_buf, zero, neg), g.const([1, 2]))
            biases[w] = (g.op("Concat", old, new, axis=4), new)
        return biases

    # -- inputs and outputs ------------------------------------------------------------------------------------------
    def inputs(self) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info("past_valid", BOOL, ["batch", "past"])]

    def kv_names(self, i: int) -> tuple[str, str]:
        return f"new_key_{i}", f"new_value_{i}"

    def kv_io(self, i: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
        kvh, hd = self.spec.num_kv_heads, self.spec.head_dim
        out_k, out_v = self.kv_names(i)
        return ([helper.make_tensor_value_info(f"past_key_{i}", FLOAT, ["batch", kvh, hd, "past"]),
                 helper.make_tensor_value_info(f"past_value_{i}", FLOAT, ["batch", kvh, "past", hd])],
                [helper.make_tensor_value_info(out_k, FLOAT, ["batch", kvh, hd, "seq"]),
                 helper.make_tensor_value_info(out_v, FLOAT, ["batch", kvh, "seq", hd])])

    # -- sublayers ---------------------------------------------------------------------------------------------------
    def input_norm(self, g: Graph, h: str, role: str) -> str:
        return self.ops.norm(g, h, role)

    def _rope(self, g: Graph, x: str, i: int) -> str:
        half = self.spec.head_dim // 2
        cos, sin = self.rope[self.ops.rope_suffix(i)]
        x1 = g.op("Slice", x, g.const([0]), g.const([half]), g.const([3]))
        x2 = g.op("Slice", x, g.const([half]), g.const([2 * half]), g.const([3]))
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=3)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    def attention(self, g: Graph, h: str, i: int) -> tuple[str, list[str]]:
        ops, spec = self.ops, self.spec
        heads, kvh, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        x = self.input_norm(g, h, f"layers.{i}.attn_norm")

        def heads_first(t: str, n: int) -> str:
            return g.op("Transpose", g.op("Reshape", t, g.const([0, 0, n, hd])), perm=[0, 2, 1, 3])

        q, k, v = ops.fused_linear(g, x, i, ("q", "k", "v"))
        q, k = heads_first(q, heads), heads_first(k, kvh)
        if spec.qk_norm:  # per head, before RoPE
            q, k = ops.norm(g, q, f"layers.{i}.q_norm"), ops.norm(g, k, f"layers.{i}.k_norm")
        q, k = self._rope(g, q, i), self._rope(g, k, i)
        v = heads_first(v, kvh)  # [B, kvh, T, hd]
        q = g.op("Mul", q, g.const(ops.attn_scale, np.float32))
        q = g.op("Reshape", q, g.const([0, kvh, -1, hd]))  # grouped heads folded into rows: [B, kvh, rep*T, hd]
        k_t = g.op("Transpose", k, perm=[0, 1, 3, 2])  # [B, kvh, hd, T]
        scores_new = g.op("MatMul", q, k_t)
        cached = i in self.cached
        bias_all, bias_new = self.biases[ops.window(i)]
        if cached:
            scores = g.op("Concat", g.op("MatMul", q, f"past_key_{i}"), scores_new, axis=3)
            total, bias, split = self.dim_st, bias_all, self.split_st
        else:
            scores, total, bias, split = scores_new, self.dim_t, bias_new, None
        shape5 = g.op("Concat", g.const([0, 0, heads // kvh, -1]), total, axis=0)
        probs = g.op("Softmax", g.op("Add", g.op("Reshape", scores, shape5), bias), axis=-1)
        probs = g.op("Reshape", probs, g.op("Concat", g.const([0, 0, -1]), total, axis=0))
        if cached:
            p_buf, p_new = g.op("Split", probs, split, axis=3, n_out=2)
            out = g.op("Add", g.op("MatMul", p_buf, f"past_value_{i}"), g.op("MatMul", p_new, v))
        else:
            out = g.op("MatMul", probs, v)
        out = g.op("Reshape", out, g.const([0, heads, -1, hd]))
        out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, heads * hd]))
        out = ops.post_norm(g, ops.linear(g, out, i, "o"), i, "attn_post_norm")
        return out, ([k_t, v] if cached else [])

    def skipped_kv(self, g: Graph) -> list[str]:
        """A skipped cached attention stores zeros it will never read again."""
        return [g.op("ConstantOfShape", self.shape_new_k), g.op("ConstantOfShape", self.shape_new_v)]

    def gate_up(self, g: Graph, x: str, i: int) -> tuple[str, str]:
        gate, up = self.ops.fused_linear(g, x, i, ("gate", "up"))
        return gate, up

    def residual(self, g: Graph, h: str, delta: str, next_norm: str | None) -> str:
        return g.op("Add", h, delta)

    def enter_tail(self, g: Graph, h: str, valid_f: str) -> tuple[str, str]:
        raise AssertionError("the portable graph has no prefill tail (tail_start is None)")

    # -- LM head -----------------------------------------------------------------------------------------------------
    def last_logits(self, g: Graph, h: str) -> None:
        """`logits` [B, V] of the last position (left padding: every row's last token is the last column)."""
        ops = self.ops
        head = ops.weight("lm_head" if "lm_head" in ops.w else "embed")
        last = g.op("Gather", h, g.const(-1), axis=1)  # [B, D]
        g.op("Gemm", ops.norm(g, last, "final_norm"), head, transB=1, outputs=["logits"])
