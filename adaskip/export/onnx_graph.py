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
from adaskip.model.rope import inv_frequencies, rope_cos_sin
from adaskip.model.spec import ModelSpec
from adaskip.plugins import similarity_onnx
from adaskip.policy import SkipPolicy

OPSET = 17
IR_VERSION = 9
GRAPH_INTERFACE = 1  # bump when graph inputs/outputs change: runtimes refuse graphs of another interface
NEG = float(np.finfo(np.float32).min)
FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
VARIANTS = ("portable", "ort")  # portable: standard ops only (TensorRT's parser); ort: ONNX Runtime contrib ops


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
        if any(w is not None and w < spec.max_position_embeddings for w in spec.attention_windows):
            raise InputError("the ONNX exporter does not support sliding-window attention yet; use --backend torch")
        if variant not in VARIANTS:
            raise InputError(f"graph variant must be one of {VARIANTS}; got {variant!r}")
        self.spec, self.w, self.policy, self.all_logits = spec, weights, policy, all_logits
        self.roles = policy.sublayer_roles()
        self.cached = set(policy.cached_layers())
        if variant == "ort" and (all_logits or not ort_variant_supported(spec, policy)):
            raise InputError("the ORT-optimized graph needs last-position logits, a head size that is a multiple of "
                             "16 and no conditional attention that keeps a KV cache (SkipDecode's growing set); use "
                             "the portable variant")
        self.variant = variant
        self.g = _Graph()
        self._weights_added: set[str] = set()

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
        return g.op("Split", y, g.const([p.shape[0] for p in parts]), axis=-1, n_out=len(roles))

    def _norm(self, g: _Graph, x: str, weight_role: str) -> str:
        # the canonical RMSNorm pattern, which ONNX Runtime fuses into one SimplifiedLayerNormalization kernel
        ms = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), axes=[-1], keepdims=1)
        std = g.op("Sqrt", g.op("Add", ms, g.const(self.spec.norm_eps, np.float32)))
        return g.op("Mul", g.op("Div", x, std), self._weight(weight_role))

    def _rope(self, g: _Graph, x: str) -> str:
        half = self.spec.head_dim // 2
        x1 = g.op("Slice", x, g.const([0]), g.const([half]), g.const([3]))
        x2 = g.op("Slice", x, g.const([half]), g.const([2 * half]), g.const([3]))
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=3)
        return g.op("Add", g.op("Mul", x, self.cos), g.op("Mul", rotated, self.sin))

    # -- blocks ------------------------------------------------------------------------------------------------------
    def _attention(self, g: _Graph, h: str, i: int) -> tuple[str, list[str]]:
        if self.variant == "ort":
            return self._attention_gqa(g, h, i)
        return self._attention_portable(g, h, i)

    def _attention_gqa(self, g: _Graph, h: str, i: int) -> tuple[str, list[str]]:
        """ONNX Runtime's fused GroupQueryAttention (rotary inside, KV written in place into a shared buffer)."""
        spec = self.spec
        x = self._norm(g, h, f"layers.{i}.attn_norm")
        q, k, v = self._fused_linear(g, x, i, ("q", "k", "v"))
        cached = i in self.cached
        past = [f"past_key_{i}", f"past_value_{i}"] if cached else ["", ""]
        out, present_k, present_v = g.op(
            "GroupQueryAttention", q, k, v, *past, "seqlens_k", "total_sequence_length", "rope_cos_half",
            "rope_sin_half", "position_ids", domain="com.microsoft", n_out=3, num_heads=spec.num_heads,
            kv_num_heads=spec.num_kv_heads, do_rotary=1, scale=1.0 / math.sqrt(spec.head_dim))
        return self._linear(g, out, i, "o"), ([present_k, present_v] if cached else [])

    def _attention_portable(self, g: _Graph, h: str, i: int) -> tuple[str, list[str]]:
        spec = self.spec
        heads, kvh, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        x = self._norm(g, h, f"layers.{i}.attn_norm")

        def heads_first(t: str, n: int) -> str:
            return g.op("Transpose", g.op("Reshape", t, g.const([0, 0, n, hd])), perm=[0, 2, 1, 3])

        q, k, v = self._fused_linear(g, x, i, ("q", "k", "v"))
        q = self._rope(g, heads_first(q, heads))
        k = self._rope(g, heads_first(k, kvh))
        v = heads_first(v, kvh)  # [B, kvh, T, hd]
        q = g.op("Mul", q, g.const(1.0 / math.sqrt(hd), np.float32))
        q = g.op("Reshape", q, g.const([0, kvh, -1, hd]))  # grouped heads folded into rows: [B, kvh, rep*T, hd]
        k_t = g.op("Transpose", k, perm=[0, 1, 3, 2])  # [B, kvh, hd, T]
        scores_new = g.op("MatMul", q, k_t)
        cached = i in self.cached
        if cached:
            scores = g.op("Concat", g.op("MatMul", q, f"past_key_{i}"), scores_new, axis=3)
            total, bias, split = self.dim_st, self.bias_all, self.split_st
        else:
            scores, total, bias, split = scores_new, self.dim_t, self.bias_new, None
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
        return self._linear(g, out, i, "o"), ([k_t, v] if cached else [])

    def _ffn(self, g: _Graph, h: str, i: int) -> tuple[str, list[str]]:
        x = self._norm(g, h, f"layers.{i}.ffn_norm")
        gate, up = self._fused_linear(g, x, i, ("gate", "up"))
        act = g.op("Mul", gate, g.op("Sigmoid", gate))
        return self._linear(g, g.op("Mul", act, up), i, "down"), []

    def _similarity(self, g: _Graph, h: str, full: str) -> tuple[str, str]:
        """IOSimilarity under If(want_stats): the stats cost ~15 small kernels per sublayer, and a runtime needs
        them only while it learns (calibration, the first W decode steps, verification)."""
        on, off = _Graph(self.g.root), _Graph(self.g.root)
        s, r = on.op(similarity_onnx.OP, h, full, self.valid_f, domain=similarity_onnx.DOMAIN, n_out=2)
        outs = g.op("If", "want_stats", n_out=2, hint="stats",
                    then_branch=_subgraph(on, "stats", [s, r], [FLOAT, FLOAT]),
                    else_branch=_subgraph(off, "no_stats", [off.op("Identity", self.nan_b),
                                                            off.op("Identity", self.nan_b)], [FLOAT, FLOAT]))
        return outs[0], outs[1]

    def _sublayer(self, j: int, h: str, block: Callable[[_Graph, str, int], tuple[str, list[str]]]) -> tuple:
        g, i, role = self.g, j // 2, self.roles[j]
        if role == "always":
            delta, extra = block(g, h, i)
            full = g.op("Add", h, delta)
            s, r = self._similarity(g, h, full)
            return full, s, r, extra
        scale = g.op("Reshape", g.op("Gather", "scale", g.const(j), axis=1), g.const([-1, 1, 1]))
        if role == "never":
            return g.op("Mul", h, scale), self.nan_b, self.nan_b, []
        skip_col = g.op("Gather", "skip", g.const(j), axis=1)
        cond = g.op("Cast", g.op("ReduceMin", g.op("Cast", skip_col, to=TensorProto.INT32), keepdims=0), to=BOOL)
        then_g, else_g = _Graph(self.g.root), _Graph(self.g.root)
        scaled_t = then_g.op("Mul", h, scale)
        then_extra = []
        if j % 2 == 0 and i in self.cached:  # a skipped cached attention stores zeros it will never read again
            then_extra = [then_g.op("ConstantOfShape", self.shape_new_k), then_g.op("ConstantOfShape", self.shape_new_v)]
        then_outs = [then_g.op("Identity", scaled_t), then_g.op("Identity", self.nan_b),
                     then_g.op("Identity", self.nan_b)] + then_extra
        delta, extra = block(else_g, h, i)
        full = else_g.op("Add", h, delta)
        s, r = self._similarity(else_g, h, full)
        mixed = else_g.op("Where", else_g.op("Reshape", skip_col, g.const([-1, 1, 1])), else_g.op("Mul", h, scale), full)
        else_outs = [mixed, s, r] + [else_g.op("Identity", e) for e in extra]
        types = [FLOAT] * len(then_outs)
        outs = g.op("If", cond, n_out=len(then_outs), hint=f"sub{j}",
                    then_branch=_subgraph(then_g, f"skip_{j}", then_outs, types),
                    else_branch=_subgraph(else_g, f"run_{j}", else_outs, types))
        return outs[0], outs[1], outs[2], outs[3:]

    # -- the whole graph ---------------------------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        spec, g = self.spec, self.g
        self._weight("embed")
        cos, sin = rope_cos_sin(inv_frequencies(spec), torch.arange(spec.max_position_embeddings))

        shape_ids = g.op("Shape", "input_ids")
        dim_b = g.op("Slice", shape_ids, g.const([0]), g.const([1]), g.const([0]))
        self.dim_t = g.op("Slice", shape_ids, g.const([1]), g.const([2]), g.const([0]))
        self.valid_f = g.op("Cast", "token_valid", to=FLOAT)
        self.nan_b = g.op("Expand", g.const(math.nan, np.float32), g.op("Concat", dim_b, g.const([1]), axis=0))  # [B, 1]
        if self.variant == "ort":
            half = spec.head_dim // 2
            g.weight("rope_cos_half", cos[:, :half])
            g.weight("rope_sin_half", sin[:, :half])
        else:
            g.weight("rope_cos", cos)
            g.weight("rope_sin", sin)
            self._prepare_portable_attention(dim_b)
        return self._build_layers(dim_b)

    def _prepare_portable_attention(self, dim_b: str) -> None:
        spec, g = self.spec, self.g
        dim_s = g.op("Slice", g.op("Shape", "past_valid"), g.const([1]), g.const([2]), g.const([0]))
        self.dim_st = g.op("Add", dim_s, self.dim_t)
        self.split_st = g.op("Concat", dim_s, self.dim_t, axis=0)
        self.cos = g.op("Unsqueeze", g.op("Gather", "rope_cos", "position_ids"), g.const([1]))  # [B, 1, T, hd]
        self.sin = g.op("Unsqueeze", g.op("Gather", "rope_sin", "position_ids"), g.const([1]))
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
        self.bias_all = g.op("Concat", buf, self.bias_new, axis=4)

    def _build_layers(self, dim_b: str) -> onnx.ModelProto:
        spec, g = self.spec, self.g
        n = spec.num_sublayers
        h = g.op("Gather", "embed", "input_ids")
        sims, ratios, kv_outputs = [], [], []
        for i in range(spec.num_layers):
            for j, block in ((2 * i, self._attention), (2 * i + 1, self._ffn)):
                h, s, r, extra = self._sublayer(j, h, block)  # s, r: [B, 1]
                sims.append(s)
                ratios.append(r)
                if extra:
                    out_k, out_v = self._kv_output_names(i)
                    g.op("Identity", extra[0], outputs=[out_k])
                    g.op("Identity", extra[1], outputs=[out_v])
                    kv_outputs.append(i)
        g.op("Concat", *sims, axis=1, outputs=["similarity"])
        g.op("Concat", *ratios, axis=1, outputs=["norm_ratio"])

        head = self._weight("lm_head" if "lm_head" in self.w else "embed")
        if self.all_logits:
            flat = g.op("Reshape", self._norm(g, h, "final_norm"), g.const([-1, spec.hidden_size]))
            logits = g.op("Gemm", flat, head, transB=1)
            g.op("Reshape", logits, g.op("Concat", dim_b, self.dim_t, g.const([spec.vocab_size]), axis=0),
                 outputs=["logits"])
        elif self.variant == "ort":  # right padding: each row's last token sits at its own index
            rows = g.op("Mul", g.op("Range", g.const(0), g.op("Squeeze", dim_b, g.const([0])), g.const(1)),
                        g.op("Squeeze", self.dim_t, g.const([0])))
            flat = g.op("Reshape", h, g.const([-1, spec.hidden_size]))
            last = g.op("Gather", flat, g.op("Add", rows, "last_index"), axis=0)
            g.op("Gemm", self._norm(g, last, "final_norm"), head, transB=1, outputs=["logits"])
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


    def _kv_output_names(self, i: int) -> tuple[str, str]:
        if self.variant == "ort":
            return f"present_key_{i}", f"present_value_{i}"
        return f"new_key_{i}", f"new_value_{i}"


def ort_variant_supported(spec: ModelSpec, policy: SkipPolicy) -> bool:
    """The ORT variant keeps KV in a shared in-place buffer: a conditional attention that owns a cache
    (SkipDecode's set growing in decode) cannot write through an If branch, so such plans use the portable graph.
    ONNX Runtime's GroupQueryAttention also needs a head size that is a multiple of 16."""
    roles, cached = policy.sublayer_roles(), set(policy.cached_layers())
    return spec.head_dim % 16 == 0 and not any(roles[2 * i] == "dynamic" for i in cached)


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
    ifs = sum(1 for node in model.graph.node if node.op_type == "If" and not node.output[0].startswith("stats"))
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
    quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), bits=4, block_size=block_size, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    (Path(model_dir) / DATA_FILE).unlink()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=True)
    return {"quantize": "int4", "block_size": block_size, "op": "com.microsoft::MatMulNBits"}
