"""One ONNX graph builder over ModelSpec + SkipPolicy; architecture quirks are data in the spec, not branches here.

Per sublayer j the policy's role decides the shape of the graph:
  never   -> removed at export: h' = scale[:, j] * h (no weights, and for attention no KV inputs)
  always  -> plain: h' = h + f(Norm(h))
  dynamic -> If(all rows skip j) then scale * h else Where(skip row, scale * h, h + f(Norm(h)))
Each sublayer that runs reports IOSimilarity (custom op `ai.adaskip::IOSimilarity`, ONNX function body).

KV cache without whole-cache copies: the graph reads a caller-owned buffer (`past_key_i` stored transposed as
[B, kv_heads, head_dim, S], `past_value_i` as [B, kv_heads, S, head_dim], validity `past_valid` [B, S]) and returns
only the new tokens' K/V; the runtime writes them into its buffer in place. Attention is computed over the buffer
part and the new part separately and joined in one softmax, with grouped query heads folded into the query rows so
K/V are never expanded. Prefill passes an empty buffer (S = 0).

Prefill tail (ort variant): after the last attention that can run, the residual stream is cut down to each row's
last token (or kept whole when stats are wanted), so the remaining FFNs and the LM head compute one token per row
(adaskip.layout.last_token_tail). The portable graph computes every token (TensorRT's conditionals would need
branch outputs of different shapes).

Sliding-window layers (spec.attention_windows) get a banded bias by position in the portable graph and
GroupQueryAttention's local_window_size in the ort one; layers with their own RoPE base (spec.local_rope_theta) read
a second cos/sin table. Sandwich norms, q/k norms, embedding scale, attention scale and activation come from the spec.

Inputs: input_ids, position_ids [B, T] int64; token_valid [B, T] bool (left padding); past_valid [B, S] bool;
skip [B, 2L] bool; scale [B, 2L] float; want_stats [] bool; past_key_i / past_value_i for live attention layers.
Outputs: logits [B, V] (last position; [B, T, V] with all_logits); similarity, norm_ratio [B, 2L] (NaN where
skipped or when want_stats is false); new_key_i [B, kv_heads, head_dim, T], new_value_i [B, kv_heads, T, head_dim].
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from adaskip.errors import InputError
from adaskip.model.rope import inv_frequencies, rope_cos_sin, uses_local_rope
from adaskip.model.spec import ModelSpec
from adaskip.export.onnx import similarity_op as similarity_onnx
from adaskip.policy import SkipPolicy
from adaskip.runtime.engine import GRAPH_INTERFACE

OPSET = 17
IR_VERSION = 9
NEG = float(np.finfo(np.float32).min)
FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
VARIANTS = ("portable", "ort")  # portable: standard ops only (TensorRT's parser); ort: ONNX Runtime contrib ops
# "always" sublayers measured under one If(want_stats): fewer If nodes run per step, at the price of keeping up to
# STATS_GROUP + 1 residual-stream tensors alive until the group's If runs (~130 MB more at 8k tokens for SmolLM2)
STATS_GROUP = 6


class _Graph:
    """Node list for the main graph or an If branch; constants and weights always live in the main graph."""

    def __init__(self, root: "_Graph | None" = None):
        self.nodes: list[onnx.NodeProto] = []
        self.root = root or self
        if root is None:
            self.initializers: list[onnx.TensorProto] = []
            self._ids = itertools.count()
            self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self.root._ids)}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "", hint: str | None = None,
           outputs: list[str] | None = None, **attrs) -> str | list[str]:
        outs = outputs or [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), domain=domain,
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        root = self.root
        if key not in root._consts:
            name = root.fresh("const")
            root.initializers.append(numpy_helper.from_array(arr, name))
            root._consts[key] = name
        return root._consts[key]

    def weight(self, name: str, t: torch.Tensor | np.ndarray) -> str:
        arr = t.detach().float().numpy() if isinstance(t, torch.Tensor) else t
        self.root.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        return name


class GraphBuilder:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], policy: SkipPolicy,
                 all_logits: bool = False, variant: str = "portable"):
        if variant not in VARIANTS:
            raise InputError(f"graph variant must be one of {VARIANTS}; got {variant!r}")
        self.spec, self.w, self.policy, self.all_logits = spec, weights, policy, all_logits
        self.roles = policy.layout.roles
        self.cached = set(policy.layout.cached_layers)
        if variant == "ort" and (all_logits or not ort_variant_supported(spec, policy)):
            raise InputError("the ORT-optimized graph needs last-position logits, a head size that is a multiple of "
                             "16 and no conditional attention that keeps a KV cache (SkipDecode's growing set); use "
                             "the portable variant")
        self.variant = variant
        self.g = _Graph()
        self._weights_added: set[str] = set()
        self._prenormed: dict[tuple[str, str], str] = {}  # (residual, norm weight) -> normed, fused with the sum
        self._stats: list[str] = []  # [B, 2m] pieces in sublayer order: (similarity, norm ratio) per sublayer
        self._pending_stats: list[tuple[str, str]] = []  # (input, output) of "always" sublayers not yet measured
        self._nans: dict[int, str] = {}

    # -- small helpers ---------------------------------------------------------------------------------------------
    def _weight(self, role: str, transpose: bool = False) -> str:
        """Register a weight once (linear weights transposed to [in, out] for MatMul) and return its name."""
        name = f"{role}.T" if transpose else role
        if name not in self._weights_added:
            t = self.w[role]
            self.g.weight(name, t.t() if transpose else t)
            self._weights_added.add(name)
        return name

    def _linear(self, g: _Graph, x: str, i: int, role: str) -> str:
        y = g.op("MatMul", x, self._weight(f"layers.{i}.{role}", transpose=True))
        if f"layers.{i}.{role}_bias" in self.w:
            y = g.op("Add", y, self._weight(f"layers.{i}.{role}_bias"))
        return y

    def _fused_linear(self, g: _Graph, x: str, i: int, roles: tuple[str, ...]) -> list[str]:
        """Linear layers reading the same input as one MatMul (q/k/v, gate/up), split afterwards: fewer, larger
        matrix products, which matters in decode where each is a matrix-vector product."""
        parts = [self.w[f"layers.{i}.{r}"].shape[0] for r in roles]
        return g.op("Split", self._fused_matmul(g, x, i, roles), g.const(parts), axis=-1, n_out=len(roles))

    def _fused_matmul(self, g: _Graph, x: str, i: int, roles: tuple[str, ...]) -> str:
        """The concatenated product of _fused_linear, unsplit (GroupQueryAttention takes packed q/k/v)."""
        name = f"layers.{i}.{'+'.join(roles)}"
        parts = [self.w[f"layers.{i}.{r}"] for r in roles]
        if name not in self._weights_added:
            self.g.weight(name + ".T", torch.cat(parts, dim=0).t())
            biases = [f"layers.{i}.{r}_bias" for r in roles]
            if any(b in self.w for b in biases):
                self.g.weight(name + ".bias", torch.cat([self.w[b] if b in self.w else torch.zeros(p.shape[0])
                                                         for b, p in zip(biases, parts)]))
            self._weights_added.add(name)
        y = g.op("MatMul", x, name + ".T")
        if any(f"layers.{i}.{r}_bias" in self.w for r in roles):
            y = g.op("Add", y, name + ".bias")
        return y

    def _norm(self, g: _Graph, x: str, weight_role: str) -> str:
        if (x, weight_role) in self._prenormed:  # computed together with the residual sum (ort variant)
            return self._prenormed[(x, weight_role)]
        # the canonical RMSNorm pattern, which ONNX Runtime fuses into one SimplifiedLayerNormalization kernel
        ms = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), axes=[-1], keepdims=1)
        std = g.op("Sqrt", g.op("Add", ms, g.const(self.spec.norm_eps, np.float32)))
        return g.op("Mul", g.op("Div", x, std), self._weight(weight_role))

    def _rope(self, g: _Graph, x: str, i: int) -> str:
        half = self.spec.head_dim // 2
        cos, sin = self.rope[uses_local_rope(self.spec, i)]
        x1 = g.op("Slice", x, g.const([0]), g.const([half]), g.const([3]))
        x2 = g.op("Slice", x, g.const([half]), g.const([2 * half]), g.const([3]))
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=3)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    def _window(self, i: int) -> int | None:
        """Layer i's sliding window, None where it cannot cut anything off (full attention)."""
        w = self.spec.attention_windows[i]
        return w if w is not None and w < self.spec.max_position_embeddings else None

    def _attn_scale(self) -> float:
        return self.spec.attn_scale if self.spec.attn_scale is not None else 1.0 / math.sqrt(self.spec.head_dim)

    def _post_norm(self, g: _Graph, x: str, i: int, role: str) -> str:
        """The sandwich norm of a block's output (spec.post_norms): part of the sublayer, before the residual add."""
        return self._norm(g, x, f"layers.{i}.{role}") if self.spec.post_norms else x

    def _head_norm(self, g: _Graph, x: str, i: int, role: str, heads: int) -> str:
        """Per-head RMSNorm (spec.qk_norm) of a [B, T, heads * head_dim] projection."""
        hd = self.spec.head_dim
        normed = self._norm(g, g.op("Reshape", x, g.const([0, 0, heads, hd])), f"layers.{i}.{role}")
        return g.op("Reshape", normed, g.const([0, 0, heads * hd]))

    # -- blocks ------------------------------------------------------------------------------------------------------
    def _attention(self, g: _Graph, h: str, i: int) -> tuple[str, list[str]]:
        if self.variant == "ort":
            return self._attention_gqa(g, h, i)
        return self._attention_portable(g, h, i)

    def _attention_gqa(self, g: _Graph, h: str, i: int) -> tuple[str, list[str]]:
        """ONNX Runtime's fused GroupQueryAttention (rotary inside, KV written in place into a shared buffer)."""
        spec = self.spec
        x = self._norm(g, h, f"layers.{i}.attn_norm")
        if spec.qk_norm:  # q and k normed per head before the kernel's rotary: passed unpacked
            q, k, v = self._fused_linear(g, x, i, ("q", "k", "v"))
            qkv = [self._head_norm(g, q, i, "q_norm", spec.num_heads),
                   self._head_norm(g, k, i, "k_norm", spec.num_kv_heads), v]
        else:  # packed: the kernel splits it, no Split node
            qkv = [self._fused_matmul(g, x, i, ("q", "k", "v")), "", ""]
        cached = i in self.cached
        past = [f"past_key_{i}", f"past_value_{i}"] if cached else ["", ""]
        rope = "_local" if uses_local_rope(spec, i) else ""
        window = self._window(i)
        # ORT's CPU kernel with local_window_size = W lets a query see W keys, itself included: Hugging Face's window
        # (key > query - W), measured against the reference in tests/test_gemma3.py (W - 1 and W + 1 both differ)
        local = {"local_window_size": window} if window is not None else {}
        out, present_k, present_v = g.op(
            "GroupQueryAttention", *qkv, *past, "seqlens_k", "total_sequence_length", f"rope_cos_half{rope}",
            f"rope_sin_half{rope}", "position_ids", domain="com.microsoft", n_out=3, num_heads=spec.num_heads,
            kv_num_heads=spec.num_kv_heads, do_rotary=1, scale=self._attn_scale(), **local)
        out = self._post_norm(g, self._linear(g, out, i, "o"), i, "attn_post_norm")
        return out, ([present_k, present_v] if cached else [])

    def _attention_portable(self, g: _Graph, h: str, i: int) -> tuple[str, list[str]]:
        spec = self.spec
        heads, kvh, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        x = self._norm(g, h, f"layers.{i}.attn_norm")

        def heads_first(t: str, n: int) -> str:
            return g.op("Transpose", g.op("Reshape", t, g.const([0, 0, n, hd])), perm=[0, 2, 1, 3])

        q, k, v = self._fused_linear(g, x, i, ("q", "k", "v"))
        q, k = heads_first(q, heads), heads_first(k, kvh)
        if spec.qk_norm:  # per head, before RoPE
            q, k = self._norm(g, q, f"layers.{i}.q_norm"), self._norm(g, k, f"layers.{i}.k_norm")
        q, k = self._rope(g, q, i), self._rope(g, k, i)
        v = heads_first(v, kvh)  # [B, kvh, T, hd]
        q = g.op("Mul", q, g.const(self._attn_scale(), np.float32))
        q = g.op("Reshape", q, g.const([0, kvh, -1, hd]))  # grouped heads folded into rows: [B, kvh, rep*T, hd]
        k_t = g.op("Transpose", k, perm=[0, 1, 3, 2])  # [B, kvh, hd, T]
        scores_new = g.op("MatMul", q, k_t)
        cached = i in self.cached
        bias_all, bias_new = self.biases[self._window(i)]
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
        out = self._post_norm(g, self._linear(g, out, i, "o"), i, "attn_post_norm")
        return out, ([k_t, v] if cached else [])

    def _ffn(self, g: _Graph, h: str, i: int) -> tuple[str, list[str]]:
        x = self._norm(g, h, f"layers.{i}.ffn_norm")
        if self.variant == "ort":  # two MatMuls: ONNX Runtime ran them faster than one fused product + Split
            gate, up = self._linear(g, x, i, "gate"), self._linear(g, x, i, "up")
        else:
            gate, up = self._fused_linear(g, x, i, ("gate", "up"))
        act = _ACTIVATIONS[self.spec.activation](g, gate)
        out = self._post_norm(g, self._linear(g, g.op("Mul", act, up), i, "down"), i, "ffn_post_norm")
        return out, []

    def _similarity(self, g: _Graph, pairs: list[tuple[str, str]], cond: str = "want_stats") -> str:
        """IOSimilarity of sublayers (input, output pairs) under one If(want_stats), as a [B, 2m] tensor
        (similarity, norm ratio per sublayer). The stats cost ~15 small kernels per sublayer and a runtime needs
        them only while it learns (calibration, the first W decode steps, verification); grouping consecutive
        sublayers keeps the If nodes, which run on every step, few."""
        on, off = _Graph(self.g.root), _Graph(self.g.root)
        stats = []
        for h, full in pairs:
            stats += on.op(similarity_onnx.OP, h, full, self.valid_f, domain=similarity_onnx.DOMAIN, n_out=2)
        return g.op("If", cond, hint="stats",
                    then_branch=_subgraph(on, "stats", [on.op("Concat", *stats, axis=1)], [FLOAT]),
                    else_branch=_subgraph(off, "no_stats", [off.op("Identity", self._nan(2 * len(pairs)))],
                                          [FLOAT]))

    def _nan(self, width: int) -> str:
        """A [B, width] tensor of NaN (the stats of sublayers that did not run)."""
        if width not in self._nans:
            g = self.g
            self._nans[width] = g.op("Expand", g.const(math.nan, np.float32),
                                     g.op("Concat", self.dim_b, g.const([width]), axis=0))
        return self._nans[width]

    def _flush_stats(self) -> None:
        if self._pending_stats:
            self._stats.append(self._similarity(self.g, self._pending_stats))
            self._pending_stats = []

    def _next_norm(self, j: int) -> str | None:
        """Weight role of the norm that sublayer j+1 applies to sublayer j's output, if j+1 runs at all."""
        if j + 1 >= self.spec.num_sublayers or self.roles[j + 1] == "never":
            return None
        return f"layers.{(j + 1) // 2}.{'attn_norm' if (j + 1) % 2 == 0 else 'ffn_norm'}"

    def _residual(self, g: _Graph, h: str, delta: str, j: int) -> str:
        """h + delta; the ort variant computes it in one SkipSimplifiedLayerNormalization together with the next
        sublayer's norm (ONNX Runtime does not fuse that itself here: the sum has several consumers)."""
        norm = self._next_norm(j)
        if self.variant != "ort" or norm is None:
            return g.op("Add", h, delta)
        normed, full = self.g.fresh("normed"), self.g.fresh("residual")
        g.op("SkipSimplifiedLayerNormalization", delta, h, self._weight(norm), domain="com.microsoft",
             outputs=[normed, "", "", full], epsilon=self.spec.norm_eps)
        self._prenormed[(full, norm)] = normed
        return full

    def _stand_in(self, g: _Graph, h: str, j: int, scale: str) -> str:
        """What skipped sublayer j outputs (adaskip.plan.Compensation is the rule): the plan's per-channel
        scale * h + shift, baked into the graph, where it has one; otherwise the runtime's scalar scale * h."""
        comp = self.policy.layout.compensation
        if comp is None or j not in comp.sublayers:
            return g.op("Mul", h, scale)
        vec_scale, vec_shift = comp.sublayers[j]
        if len(vec_scale) != self.spec.hidden_size or len(vec_shift) != self.spec.hidden_size:
            raise InputError(f"the plan's compensation for sublayer {j} has {len(vec_scale)} channels; the model has "
                             f"{self.spec.hidden_size}")
        names = (f"stand_in.{j}.scale", f"stand_in.{j}.shift")
        if names[0] not in self._weights_added:
            self.g.weight(names[0], np.asarray(vec_scale, np.float32))
            self.g.weight(names[1], np.asarray(vec_shift, np.float32))
            self._weights_added.update(names)
        return g.op("Add", g.op("Mul", h, names[0]), names[1])

    def _sublayer(self, j: int, h: str, block: Callable[[_Graph, str, int], tuple[str, list[str]]]) -> tuple:
        g, i, role = self.g, j // 2, self.roles[j]
        if role == "always":
            delta, extra = block(g, h, i)
            full = self._residual(g, h, delta, j)
            self._pending_stats.append((h, full))
            if len(self._pending_stats) == STATS_GROUP:
                self._flush_stats()
            return full, extra
        self._flush_stats()
        scale = g.op("Reshape", g.op("Gather", "scale", g.const(j), axis=1), g.const([-1, 1, 1]))
        if role == "never":
            self._stats.append(self._nan(2))
            return self._stand_in(g, h, j, scale), []
        skip_col = g.op("Gather", "skip", g.const(j), axis=1)
        cond = g.op("Cast", g.op("ReduceMin", g.op("Cast", skip_col, to=TensorProto.INT32), keepdims=0), to=BOOL)
        then_g, else_g = _Graph(self.g.root), _Graph(self.g.root)
        scaled_t = self._stand_in(then_g, h, j, scale)
        then_extra = []
        if j % 2 == 0 and i in self.cached:  # a skipped cached attention stores zeros it will never read again
            then_extra = [then_g.op("ConstantOfShape", self.shape_new_k), then_g.op("ConstantOfShape", self.shape_new_v)]
        # portable: no If inside this If's branch (TensorRT-RTX 1.7's builder fails on nested conditionals with an
        # internal Myelin CHECK); the branch passes `full` out and the stats If follows this one (same results)
        flat = self.variant == "portable"
        then_outs = [then_g.op("Identity", scaled_t), then_g.op("Identity", scaled_t if flat else self._nan(2))]
        then_outs += then_extra
        delta, extra = block(else_g, h, i)
        full = else_g.op("Add", h, delta)
        stats = else_g.op("Identity", full) if flat else self._similarity(else_g, [(h, full)])
        mixed = else_g.op("Where", else_g.op("Reshape", skip_col, g.const([-1, 1, 1])), self._stand_in(else_g, h, j, scale), full)
        else_outs = [mixed, stats] + [else_g.op("Identity", e) for e in extra]
        types = [FLOAT] * len(then_outs)
        outs = g.op("If", cond, n_out=len(then_outs), hint=f"sub{j}",
                    then_branch=_subgraph(then_g, f"skip_{j}", then_outs, types),
                    else_branch=_subgraph(else_g, f"run_{j}", else_outs, types))
        if flat:  # stats of the rows that ran, when asked for and some row ran (as the nested form computes them)
            outs[1] = self._similarity(g, [(h, outs[1])], cond=g.op("And", "want_stats", g.op("Not", cond)))
        self._stats.append(outs[1])
        return outs[0], outs[2:]

    # -- the whole graph ---------------------------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        spec, g = self.spec, self.g
        self._weight("embed")
        positions = torch.arange(spec.max_position_embeddings)
        # one cos/sin table per RoPE: the global one, and the sliding-window layers' own where it differs
        tables = {"": rope_cos_sin(inv_frequencies(spec), positions)}
        if any(uses_local_rope(spec, i) for i in range(spec.num_layers)):
            tables["_local"] = rope_cos_sin(inv_frequencies(spec, local=True), positions)

        shape_ids = g.op("Shape", "input_ids")
        dim_b = g.op("Slice", shape_ids, g.const([0]), g.const([1]), g.const([0]))
        self.dim_t = g.op("Slice", shape_ids, g.const([1]), g.const([2]), g.const([0]))
        self.valid_f = g.op("Cast", "token_valid", to=FLOAT)
        self.dim_b = dim_b
        for suffix, (cos, sin) in tables.items():
            if self.variant == "ort":
                half = spec.head_dim // 2
                g.weight(f"rope_cos_half{suffix}", cos[:, :half])
                g.weight(f"rope_sin_half{suffix}", sin[:, :half])
            else:
                g.weight(f"rope_cos{suffix}", cos)
                g.weight(f"rope_sin{suffix}", sin)
        if self.variant == "portable":
            self._prepare_portable_attention(dim_b, [suffix == "_local" for suffix in tables])
        return self._build_layers(dim_b)

    def _prepare_portable_attention(self, dim_b: str, ropes: list[bool]) -> None:
        spec, g = self.spec, self.g
        dim_s = g.op("Slice", g.op("Shape", "past_valid"), g.const([1]), g.const([2]), g.const([0]))
        self.dim_st = g.op("Add", dim_s, self.dim_t)
        self.split_st = g.op("Concat", dim_s, self.dim_t, axis=0)
        self.rope: dict[bool, tuple[str, str]] = {}  # uses_local_rope -> cos, sin [B, 1, T, hd]
        for local in ropes:
            suffix = "_local" if local else ""
            self.rope[local] = tuple(g.op("Unsqueeze", g.op("Gather", f"rope_{f}{suffix}", "position_ids"),
                                          g.const([1])) for f in ("cos", "sin"))
        kv = g.const([spec.num_kv_heads])
        self.shape_new_k = g.op("Concat", dim_b, kv, g.const([spec.head_dim]), self.dim_t, axis=0)
        self.shape_new_v = g.op("Concat", dim_b, kv, self.dim_t, g.const([spec.head_dim]), axis=0)

        # attention biases, [B, 1, 1, T, X]: buffer slots by validity; new tokens causal + padding (+ self)
        t_scalar = g.op("Squeeze", self.dim_t, g.const([0]))
        rng = g.op("Range", g.const(0), t_scalar, g.const(1))
        q_idx = g.op("Unsqueeze", rng, g.const([1]))
        k_idx = g.op("Unsqueeze", rng, g.const([0]))
        allowed = g.op("And", g.op("Not", g.op("Greater", k_idx, q_idx)),
                       g.op("Unsqueeze", "token_valid", g.const([1])))  # [B, T, T]
        allowed = g.op("Or", allowed, g.op("Equal", k_idx, q_idx))
        zero, neg = g.const(0.0, np.float32), g.const(NEG, np.float32)
        self.bias_new = g.op("Unsqueeze", g.op("Where", allowed, zero, neg), g.const([1, 2]))
        buf = g.op("Unsqueeze", g.op("Where", "past_valid", zero, neg), g.const([1, 2, 3]))  # [B, 1, 1, 1, S]
        buf = g.op("Expand", buf, g.op("Concat", dim_b, g.const([1, 1]), self.dim_t, dim_s, axis=0))
        self.biases = {None: (g.op("Concat", buf, self.bias_new, axis=4), self.bias_new)}  # window -> (all, new)
        windows = sorted({self._window(i) for i in range(spec.num_layers)} - {None})
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
            self.biases[w] = (g.op("Concat", old, new, axis=4), new)

    def _build_layers(self, dim_b: str) -> onnx.ModelProto:
        spec, g = self.spec, self.g
        n = spec.num_sublayers
        h = g.op("Gather", "embed", "input_ids")
        if spec.embed_scale != 1.0:  # scaled in float32, as the reference does
            h = g.op("Mul", h, g.const(spec.embed_scale, np.float32))
        kv_outputs = []
        # the ort variant runs the prefill tail for each row's last token only (adaskip.layout.last_token_tail)
        tail = self.policy.layout.prefill_tail_start if self.variant == "ort" else None
        for i in range(spec.num_layers):
            for j, block in ((2 * i, self._attention), (2 * i + 1, self._ffn)):
                if j == tail:
                    h = self._enter_tail(h)
                h, extra = self._sublayer(j, h, block)
                if extra:
                    out_k, out_v = self._kv_output_names(i)
                    g.op("Identity", extra[0], outputs=[out_k])
                    g.op("Identity", extra[1], outputs=[out_v])
                    kv_outputs.append(i)
        self._flush_stats()
        pairs = g.op("Reshape", g.op("Concat", *self._stats, axis=1), g.const([0, n, 2]))
        sim, ratio = g.op("Split", pairs, axis=2, n_out=2)
        g.op("Squeeze", sim, g.const([2]), outputs=["similarity"])
        g.op("Squeeze", ratio, g.const([2]), outputs=["norm_ratio"])

        head = self._weight("lm_head" if "lm_head" in self.w else "embed")
        if self.all_logits:
            flat = g.op("Reshape", self._norm(g, h, "final_norm"), g.const([-1, spec.hidden_size]))
            logits = g.op("Gemm", flat, head, transB=1)
            g.op("Reshape", logits, g.op("Concat", dim_b, self.dim_t, g.const([spec.vocab_size]), axis=0),
                 outputs=["logits"])
        elif self.variant == "ort":  # right padding: each row's last token sits at its own index in the tail
            last = g.op("GatherND", h, g.op("Unsqueeze", self.head_row, g.const([1])), batch_dims=1)  # [B, D]
            # MatMul on a [hidden, vocab] head: ONNX Runtime's MatMul ran the decode-time LM head ~1.8 ms faster
            # than Gemm(transB) for SmolLM2. A tied head is transposed once at session load (constant folding):
            # one more vocab x hidden copy in memory, as onnxruntime-genai's graphs also keep
            head_t = (self._weight("lm_head", transpose=True) if "lm_head" in self.w
                      else g.op("Transpose", head, perm=[1, 0]))
            g.op("MatMul", self._norm(g, last, "final_norm"), head_t, outputs=["logits"])
        else:
            last = g.op("Gather", h, g.const(-1), axis=1)  # [B, D]
            g.op("Gemm", self._norm(g, last, "final_norm"), head, transB=1, outputs=["logits"])

        kvh, hd = spec.num_kv_heads, spec.head_dim
        inputs = [
            helper.make_tensor_value_info("input_ids", INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("position_ids", INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("token_valid", BOOL, ["batch", "seq"]),
        ]
        if self.variant == "ort":
            inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
                       helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
                       helper.make_tensor_value_info("last_index", INT64, ["batch"])]
        else:
            inputs += [helper.make_tensor_value_info("past_valid", BOOL, ["batch", "past"])]
        inputs += [
            helper.make_tensor_value_info("skip", BOOL, ["batch", n]),
            helper.make_tensor_value_info("scale", FLOAT, ["batch", n]),
            helper.make_tensor_value_info("want_stats", BOOL, []),
        ]
        outputs = [
            helper.make_tensor_value_info("logits", FLOAT, ["batch", "seq", spec.vocab_size] if self.all_logits
                                          else ["batch", spec.vocab_size]),
            helper.make_tensor_value_info("similarity", FLOAT, ["batch", n]),
            helper.make_tensor_value_info("norm_ratio", FLOAT, ["batch", n]),
        ]
        for i in kv_outputs:
            out_k, out_v = self._kv_output_names(i)
            if self.variant == "ort":  # BNSH buffers of the request's capacity, shared between past and present
                inputs += [helper.make_tensor_value_info(f"past_key_{i}", FLOAT, ["batch", kvh, "capacity", hd]),
                           helper.make_tensor_value_info(f"past_value_{i}", FLOAT, ["batch", kvh, "capacity", hd])]
                outputs += [helper.make_tensor_value_info(out_k, FLOAT, ["batch", kvh, "capacity", hd]),
                            helper.make_tensor_value_info(out_v, FLOAT, ["batch", kvh, "capacity", hd])]
            else:
                inputs += [helper.make_tensor_value_info(f"past_key_{i}", FLOAT, ["batch", kvh, hd, "past"]),
                           helper.make_tensor_value_info(f"past_value_{i}", FLOAT, ["batch", kvh, "past", hd])]
                outputs += [helper.make_tensor_value_info(out_k, FLOAT, ["batch", kvh, hd, "seq"]),
                            helper.make_tensor_value_info(out_v, FLOAT, ["batch", kvh, "seq", hd])]
        graph = helper.make_graph(g.nodes, "adaskip", inputs, outputs, initializer=g.initializers)
        opsets = [helper.make_opsetid("", OPSET), similarity_onnx.opset_import()]
        if self.variant == "ort":
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, functions=[similarity_onnx.function_proto()],
                                  producer_name="adaskip", doc_string=f"adaskip graph, variant {self.variant}")
        model.ir_version = IR_VERSION
        return model

    def _enter_tail(self, h: str) -> str:
        """The rows of the residual stream the rest of the graph computes: each row's last token (`last_index`),
        or every token when stats are wanted (they average over all of them; a decode step has one token anyway).
        Sets the tail's token validity and the index of each row's last token among the tail rows."""
        g = self.g
        self._flush_stats()  # the stats so far average over every token
        every, last = _Graph(g.root), _Graph(g.root)
        t = every.op("Squeeze", self.dim_t, g.const([0]))
        positions = every.op("Unsqueeze", every.op("Range", g.const(0), t, g.const(1)), g.const([0]))
        every_out = every.op("Expand", positions, every.op("Concat", self.dim_b, self.dim_t, axis=0))
        last_out = last.op("Unsqueeze", "last_index", g.const([1]))
        rows = g.op("If", "want_stats", hint="tail_rows",
                    then_branch=_subgraph(every, "every_token", [every_out], [INT64]),
                    else_branch=_subgraph(last, "last_token", [last_out], [INT64]))
        index = g.op("Unsqueeze", rows, g.const([2]))  # [B, R, 1]
        tail_h = g.op("GatherND", h, index, batch_dims=1)
        for (x, role), normed in list(self._prenormed.items()):  # a norm fused with the sum: row-wise, gathered too
            if x == h:
                self._prenormed[(tail_h, role)] = g.op("GatherND", normed, index, batch_dims=1)
        self.valid_f = g.op("GatherND", self.valid_f, index, batch_dims=1)
        self.head_row = g.op("Where", "want_stats", "last_index", g.const(0))
        return tail_h

    def _kv_output_names(self, i: int) -> tuple[str, str]:
        if self.variant == "ort":
            return f"present_key_{i}", f"present_value_{i}"
        return f"new_key_{i}", f"new_value_{i}"


def _gelu_tanh(g: _Graph, x: str) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in opset-17 ops (ONNX Runtime fuses it into FastGelu)."""
    cube = g.op("Mul", g.op("Mul", x, x), x)
    inner = g.op("Mul", g.op("Add", x, g.op("Mul", cube, g.const(0.044715, np.float32))),
                 g.const(math.sqrt(2.0 / math.pi), np.float32))
    return g.op("Mul", g.op("Mul", x, g.const(0.5, np.float32)),
                g.op("Add", g.op("Tanh", inner), g.const(1.0, np.float32)))


# the gated FFN's activation by ModelSpec.activation
_ACTIVATIONS: dict[str, Callable[[_Graph, str], str]] = {
    "silu": lambda g, x: g.op("Mul", x, g.op("Sigmoid", x)),
    "gelu_tanh": _gelu_tanh,
}


def gqa_supports(spec: ModelSpec) -> bool:
    """ONNX Runtime's GroupQueryAttention needs a head size that is a multiple of 16."""
    return spec.head_dim % 16 == 0


def ort_variant_supported(spec: ModelSpec, policy: SkipPolicy) -> bool:
    """The ORT variant keeps KV in a shared in-place buffer: a conditional attention that owns a cache
    (SkipDecode's set growing in decode) cannot write through an If branch, so such plans use the portable graph.
    It also needs GroupQueryAttention to take the model's heads (gqa_supports)."""
    roles, cached = policy.layout.roles, set(policy.layout.cached_layers)
    return gqa_supports(spec) and not any(roles[2 * i] == "dynamic" for i in cached)


def _subgraph(g: _Graph, name: str, outs: list[str], types: list[int]) -> onnx.GraphProto:
    return helper.make_graph(g.nodes, name, [], [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types)])


def build_onnx(spec: ModelSpec, weights: dict[str, torch.Tensor], policy: SkipPolicy,
               all_logits: bool = False, variant: str = "portable") -> onnx.ModelProto:
    return GraphBuilder(spec, weights, policy, all_logits, variant).build()


MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def save_onnx(model: onnx.ModelProto, out_dir, check: bool = True) -> dict:
    """Write model.onnx + model.onnx.data (weights as external data) and run the full checker on the result."""
    from pathlib import Path

    out = Path(out_dir)
    onnx.save_model(model, str(out / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    if check:
        onnx.checker.check_model(str(out / MODEL_FILE), full_check=True)
    kv = sorted(int(i.name.rsplit("_", 1)[1]) for i in model.graph.input if i.name.startswith("past_key_"))
    variant = "ort" if any(op.domain == "com.microsoft" for op in model.opset_import) else "portable"
    ifs = sum(1 for node in model.graph.node if node.op_type == "If" and node.output[0].startswith("sub"))  # sublayers
    return {"file": MODEL_FILE, "data": DATA_FILE, "opset": OPSET, "interface": GRAPH_INTERFACE, "variant": variant,
            "kv_layers": kv, "conditionals": ifs}


QUANTIZE_CHOICES = ("int4",)


def quantize_int4(model_dir, block_size: int = 32) -> dict:
    """Weight-only int4 (ONNX Runtime's MatMulNBits, symmetric, int8 activations) for every linear layer, inside
    the If branches too; attention products and the tied embedding / LM head stay fp32. ORT-specific: the result
    uses a com.microsoft op, so it is an ONNX Runtime engine, not the portable graph."""
    from pathlib import Path

    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    path = Path(model_dir) / MODEL_FILE
    model = onnx.load(str(path))
    head = [n.name for n in model.graph.node if "logits" in n.output]  # the LM head stays fp32
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                     nodes_to_exclude=head)
    quantizer.process()
    (Path(model_dir) / DATA_FILE).unlink()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=True)
    return {"quantize": "int4", "block_size": block_size, "op": "com.microsoft::MatMulNBits"}
