"""The ort lowering: attention, KV cache, residual adds, FFN products and LM head in ONNX Runtime's contrib ops
(domain com.microsoft). It implements adaskip.export.onnx.graph.Lowering; adaskip.export.onnx.variants says which
models and plans it can take.

KV cache: GroupQueryAttention (rotary inside) reads and writes a caller-owned buffer per cached layer in place:
`past_key_i` / `past_value_i` [B, kv_heads, capacity, head_dim] (BNSH), bound as `present_key_i` / `present_value_i`
too. Extra inputs: `seqlens_k` [B] int32 (each row's valid tokens after this forward, minus one),
`total_sequence_length` [] int32 and `last_index` [B] int64 (each row's last new token; rows are right-padded).
Sliding-window layers use the kernel's local_window_size. The buffers may be float16 or int8 (`kv_type`): the kernel's
cache type is its own (T_CACHE), queries and the attention math stay float32. float16 halves the memory, but ONNX
Runtime 1.32's CPU provider has no kernel for that pair and casts the whole cache to float32 and back each step (~2x
slower decode; docs/benchmarks.md). int8 quarters it and the kernel reads it natively: each layer's K and V carry
fitted per-channel scales (`kv_scale_{k,v}_i` [kv_heads, 1, head_dim]; adaskip/calibrate/kv_scales.py).

Residual adds: SkipSimplifiedLayerNormalization computes h + delta together with the next sublayer's input norm.
FFN: gate and up as two MatMuls. Prefill tail (adaskip.layout.last_token_tail): after the last attention that can
run, only each row's last token goes on (every token when stats are wanted). LM head: one MatMul per row.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from adaskip.export.onnx.nodes import FLOAT, INT32, INT64, Graph
from adaskip.export.onnx.ops import Dims, Ops
from adaskip.layout import SkipLayout

# KV cache dtypes of the ort variant -> ONNX element type (GroupQueryAttention's cache type T_CACHE may differ from
# its queries'; checked against the reference in tests/test_quantize.py)
KV_DTYPES = {"float32": FLOAT, "float16": onnx.TensorProto.FLOAT16, "int8": onnx.TensorProto.INT8}
QUANTIZED_KV = {"int8"}  # cache types stored with per-channel scales (GroupQueryAttention's kv_cache_bit_width 8)


class OrtLowering:
    variant = "ort"
    opsets = (helper.make_opsetid("com.microsoft", 1),)
    nested_ifs = True

    def __init__(self, ops: Ops, layout: SkipLayout, dims: Dims, kv_type: int = FLOAT,
                 kv_scales: dict[int, tuple[np.ndarray, np.ndarray]] | None = None):
        self.ops, self.spec, self.dims = ops, ops.spec, dims
        self.kv_type = kv_type  # the KV buffers' element type (KV_DTYPES)
        self.kv_scales = kv_scales  # per cached layer (k_scale, v_scale) of a quantized cache, else None
        self.cached = set(layout.cached_layers)
        self.tail_start: int | None = layout.prefill_tail_start
        # (residual, norm weight) -> the norm computed together with the residual sum
        self._prenormed: dict[tuple[str, str], str] = {}
        # each row's last token among the rows the residual stream holds (all of them until the tail cuts them)
        self.head_row = "last_index"
        half = self.spec.head_dim // 2
        for suffix, (cos, sin) in ops.rope_tables().items():  # the kernel takes half-width tables
            ops.g.weight(f"rope_cos_half{suffix}", cos[:, :half])
            ops.g.weight(f"rope_sin_half{suffix}", sin[:, :half])

    # -- inputs and outputs ------------------------------------------------------------------------------------------
    def inputs(self) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info("seqlens_k", INT32, ["batch"]),
                helper.make_tensor_value_info("total_sequence_length", INT32, []),
                helper.make_tensor_value_info("last_index", INT64, ["batch"])]

    def kv_names(self, i: int) -> tuple[str, str]:
        return f"present_key_{i}", f"present_value_{i}"

    def kv_io(self, i: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
        """BNSH buffers of the request's capacity, shared between past and present."""
        shape = ["batch", self.spec.num_kv_heads, "capacity", self.spec.head_dim]
        return ([helper.make_tensor_value_info(f"past_key_{i}", self.kv_type, shape),
                 helper.make_tensor_value_info(f"past_value_{i}", self.kv_type, shape)],
                [helper.make_tensor_value_info(name, self.kv_type, shape) for name in self.kv_names(i)])

    # -- sublayers ---------------------------------------------------------------------------------------------------
    def input_norm(self, g: Graph, h: str, role: str) -> str:
        """A sublayer's input norm: the one computed with the residual sum, where there is one."""
        if (h, role) in self._prenormed:
            return self._prenormed[(h, role)]
        return self.ops.norm(g, h, role)

    def attention(self, g: Graph, h: str, i: int) -> tuple[str, list[str]]:
        ops, spec = self.ops, self.spec
        x = self.input_norm(g, h, f"layers.{i}.attn_norm")
        if spec.qk_norm:  # q and k normed per head before the kernel's rotary: passed unpacked
            q, k, v = ops.fused_linear(g, x, i, ("q", "k", "v"))
            qkv = [ops.head_norm(g, q, i, "q_norm", spec.num_heads),
                   ops.head_norm(g, k, i, "k_norm", spec.num_kv_heads), v]
        else:  # packed: the kernel splits it, no Split node
            qkv = [ops.fused_matmul(g, x, i, ("q", "k", "v")), "", ""]
        cached = i in self.cached
        past = [f"past_key_{i}", f"past_value_{i}"] if cached else ["", ""]
        rope = ops.rope_suffix(i)
        window = ops.window(i)
        # ORT's CPU kernel with local_window_size = W lets a query see W keys, itself included: Hugging Face's window
        # (key > query - W), measured against the reference in tests/test_gemma3.py (W - 1 and W + 1 both differ)
        local = {"local_window_size": window} if window is not None else {}
        quant: list[str] = []
        if cached and self.kv_scales is not None:  # after attention_bias and head_sink (unused): k_scale, v_scale
            k_scale, v_scale = self.kv_scales[i]
            quant = ["", "", g.weight(f"kv_scale_k_{i}", k_scale), g.weight(f"kv_scale_v_{i}", v_scale)]
            local.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        out, present_k, present_v = g.op(
            "GroupQueryAttention", *qkv, *past, "seqlens_k", "total_sequence_length", f"rope_cos_half{rope}",
            f"rope_sin_half{rope}", "position_ids", *quant, domain="com.microsoft", n_out=3,
            num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, do_rotary=1, scale=ops.attn_scale, **local)
        out = ops.post_norm(g, ops.linear(g, out, i, "o"), i, "attn_post_norm")
        return out, ([present_k, present_v] if cached else [])

    def skipped_kv(self, g: Graph) -> list[str]:
        raise AssertionError("a conditional attention with a KV cache cannot write the shared buffer through an If "
                             "branch; adaskip.export.onnx.variants refuses such plans for the ort variant")

    def gate_up(self, g: Graph, x: str, i: int) -> tuple[str, str]:
        # two MatMuls: ONNX Runtime ran them faster than one fused product + Split
        return self.ops.linear(g, x, i, "gate"), self.ops.linear(g, x, i, "up")

    def residual(self, g: Graph, h: str, delta: str, next_norm: str | None) -> str:
        """h + delta, in one SkipSimplifiedLayerNormalization with the next sublayer's input norm where it runs
        (ONNX Runtime does not fuse that itself here: the sum has several consumers)."""
        if next_norm is None:
            return g.op("Add", h, delta)
        normed, full = g.fresh("normed"), g.fresh("residual")
        g.op("SkipSimplifiedLayerNormalization", delta, h, self.ops.weight(next_norm), domain="com.microsoft",
             outputs=[normed, "", "", full], epsilon=self.spec.norm_eps)
        self._prenormed[(full, next_norm)] = normed
        return full

    def enter_tail(self, g: Graph, h: str, valid_f: str) -> tuple[str, str]:
        """The rows of the residual stream (and their float validity) the rest of the graph computes: each row's
        last token (`last_index`), or every token when stats are wanted (they average over all of them; a decode
        step has one token anyway)."""
        every, last = g.branch(), g.branch()
        t = every.op("Squeeze", self.dims.tokens, g.const([0]))
        positions = every.op("Unsqueeze", every.op("Range", g.const(0), t, g.const(1)), g.const([0]))
        every_out = every.op("Expand", positions, every.op("Concat", self.dims.batch, self.dims.tokens, axis=0))
        last_out = last.op("Unsqueeze", "last_index", g.const([1]))
        rows = g.op("If", "want_stats", hint="tail_rows",
                    then_branch=every.subgraph("every_token", [every_out], [INT64]),
                    else_branch=last.subgraph("last_token", [last_out], [INT64]))
        index = g.op("Unsqueeze", rows, g.const([2]))  # [B, R, 1]
        tail_h = g.op("GatherND", h, index, batch_dims=1)
        for (x, role), normed in list(self._prenormed.items()):  # a norm fused with the sum: row-wise, gathered too
            if x == h:
                self._prenormed[(tail_h, role)] = g.op("GatherND", normed, index, batch_dims=1)
        tail_valid = g.op("GatherND", valid_f, index, batch_dims=1)
        self.head_row = g.op("Where", "want_stats", "last_index", g.const(0))
        return tail_h, tail_valid

    # -- LM head -----------------------------------------------------------------------------------------------------
    def last_logits(self, g: Graph, h: str) -> None:
        """`logits` [B, V] of each row's last token (right padding: it sits at the row's own index)."""
        ops = self.ops
        last = g.op("GatherND", h, g.op("Unsqueeze", self.head_row, g.const([1])), batch_dims=1)  # [B, D]
        # MatMul on a [hidden, vocab] head: ONNX Runtime's MatMul ran the decode-time LM head ~1.8 ms faster
        # than Gemm(transB) for SmolLM2. A tied head is transposed once at session load (constant folding):
        # one more vocab x hidden copy in memory, as onnxruntime-genai's graphs also keep
        head_t = (ops.weight("lm_head", transpose=True) if "lm_head" in ops.w
                  else g.op("Transpose", ops.weight("embed"), perm=[1, 0]))
        g.op("MatMul", ops.norm(g, last, "final_norm"), head_t, outputs=["logits"])
