"""The ONNX graph of a model + SkipLayout: one skeleton, one lowering per graph variant (ort.py, portable.py).

The skeleton owns what both variants share: the inputs and outputs, the residual stream, the stand-ins of skipped
sublayers, the similarity stats and the conditionals. Per sublayer j the layout's role decides its shape:
  never   -> removed at export: h' = scale[:, j] * h (no weights, and for attention no KV inputs)
  always  -> plain: h' = h + f(Norm(h))
  dynamic -> If(all rows skip j) then scale * h else Where(skip row, scale * h, h + f(Norm(h)))
Each sublayer that runs reports IOSimilarity (custom op `ai.adaskip::IOSimilarity`, ONNX function body), under an
If(want_stats). Node names say where a node sits: /inputs, /layers.3/attn, /layers.3/ffn, /stats, /tail, /lm_head.

A lowering (the Lowering protocol) owns what differs: attention and its KV inputs/outputs, the residual add, the
FFN's gate/up products, the prefill tail and the LM head. adaskip.export.onnx.variants chooses between them.

Inputs: input_ids, position_ids [B, T] int64; token_valid [B, T] bool; the lowering's own (portable: past_valid;
ort: seqlens_k, total_sequence_length, last_index); skip [B, 2L] bool; scale [B, 2L] float; want_stats [] bool;
past_key_i / past_value_i for live attention layers. Outputs: logits [B, V] (last position; [B, T, V] with
all_logits, portable only); similarity, norm_ratio [B, 2L] (NaN where skipped or when want_stats is false); the new
K/V of each live attention layer (portable: new_key_i / new_value_i; ort: present_key_i / present_value_i).
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import numpy as np
import onnx
import torch
from onnx import helper

from adaskip.errors import InputError, check_choice
from adaskip.export.onnx import similarity_op as similarity_onnx
from adaskip.export.onnx.nodes import BOOL, FLOAT, INT32, INT64, IR_VERSION, OPSET, Graph
from adaskip.export.onnx.ops import ACTIVATIONS, Dims, Ops
from adaskip.export.onnx.ort import KV_DTYPES, QUANTIZED_KV, OrtLowering
from adaskip.export.onnx.portable import PortableLowering
from adaskip.export.onnx.variants import VARIANT_KEY, check_kv_cache, check_variant
from adaskip.layout import SkipLayout
from adaskip.model.spec import ModelSpec

# "always" sublayers measured under one If(want_stats): fewer If nodes run per step, at the price of keeping up to
# STATS_GROUP + 1 residual-stream tensors alive until the group's If runs (~130 MB more at 8k tokens for SmolLM2)
STATS_GROUP = 6

Block = Callable[[Graph, str, int], tuple[str, list[str]]]  # (graph, h, layer) -> (sublayer output, new K/V)


class Lowering(Protocol):
    """What one graph variant decides; every method adds nodes to the graph it is given."""
    variant: str
    opsets: tuple[onnx.OperatorSetIdProto, ...]  # besides the standard domain and ai.adaskip
    nested_ifs: bool  # whether a dynamic sublayer's stats If may sit inside its own If's branch
    tail_start: int | None  # the sublayer where the prefill tail starts; None: every token throughout

    def inputs(self) -> list[onnx.ValueInfoProto]: ...  # declared between token_valid and skip

    def kv_names(self, i: int) -> tuple[str, str]: ...  # layer i's K/V outputs

    def kv_io(self, i: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]: ...  # past, new

    def input_norm(self, g: Graph, h: str, role: str) -> str: ...  # a sublayer's Norm(h)

    def attention(self, g: Graph, h: str, i: int) -> tuple[str, list[str]]: ...  # f(Norm(h)), new K/V if cached

    def skipped_kv(self, g: Graph) -> list[str]: ...  # the new K/V of a cached attention all rows skip

    def gate_up(self, g: Graph, x: str, i: int) -> tuple[str, str]: ...

    # h + delta; next_norm: the weight role of the norm the next sublayer applies to it (None where none runs)
    def residual(self, g: Graph, h: str, delta: str, next_norm: str | None) -> str: ...

    def enter_tail(self, g: Graph, h: str, valid_f: str) -> tuple[str, str]: ...  # (rows of h, their validity)

    def last_logits(self, g: Graph, h: str) -> None: ...  # writes `logits` [B, V]


LOWERINGS: dict[str, Callable[[Ops, SkipLayout, Dims], Lowering]] = {"portable": PortableLowering, "ort": OrtLowering}


class GraphBuilder:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], layout: SkipLayout, variant: str,
                 all_logits: bool = False, kv_dtype: str = "float32",
                 kv_scales: dict[int, tuple[np.ndarray, np.ndarray]] | None = None):
        check_variant(spec, layout, variant, all_logits)
        check_choice(kv_dtype, KV_DTYPES, "the KV cache dtype")
        check_kv_cache(spec, kv_dtype, layout, variant)
        missing = [i for i in layout.cached_layers if i not in (kv_scales or {})]
        if kv_dtype in QUANTIZED_KV and missing:
            raise InputError(f"a KV cache of type {kv_dtype} needs fitted scales for every cached layer; none for "
                             f"layers {missing}")
        if kv_dtype not in QUANTIZED_KV and kv_scales is not None:
            raise InputError(f"KV scales are for a quantized cache ({', '.join(sorted(QUANTIZED_KV))}), not {kv_dtype}")
        shape = (spec.num_kv_heads, 1, spec.head_dim)
        for i, pair in (kv_scales or {}).items():  # what the kernel divides by: one positive, finite scale a channel
            if any(np.shape(a) != shape or not np.all(np.isfinite(a)) or not np.all(np.asarray(a) > 0) for a in pair):
                raise InputError(f"the KV scales of layer {i} must be two {list(shape)} arrays of positive, finite "
                                 "values")
        self.spec, self.layout, self.all_logits = spec, layout, all_logits
        self.roles = layout.roles
        self.cached = set(layout.cached_layers)
        self.g = g = Graph()
        self.ops = Ops(g, spec, weights)
        self.ops.weight("embed")
        with g.scope("/inputs"):
            shape_ids = g.op("Shape", "input_ids")
            self.dims = Dims(batch=g.op("Slice", shape_ids, g.const([0]), g.const([1]), g.const([0])),
                             tokens=g.op("Slice", shape_ids, g.const([1]), g.const([2]), g.const([0])))
            self.valid_f = g.op("Cast", "token_valid", to=FLOAT)  # the rows IOSimilarity averages over
        kv = {"kv_type": KV_DTYPES[kv_dtype], "kv_scales": kv_scales} if variant == "ort" else {}
        self.lowering = LOWERINGS[variant](self.ops, layout, self.dims, **kv)
        self._stats: list[str] = []  # [B, 2m] pieces in sublayer order: (similarity, norm ratio) per sublayer
        self._pending_stats: list[tuple[int, str, str]] = []  # (j, input, output) of "always" sublayers not measured
        self._nans: dict[int, str] = {}

    # -- stats -------------------------------------------------------------------------------------------------------
    def _similarity(self, g: Graph, pairs: list[tuple[str, str]], cond: str = "want_stats") -> str:
        """IOSimilarity of sublayers (input, output pairs) under one If(want_stats), as a [B, 2m] tensor
        (similarity, norm ratio per sublayer). The stats cost ~15 small kernels per sublayer and a runtime needs
        them only while it learns (calibration, the first W decode steps, verification); grouping consecutive
        sublayers keeps the If nodes, which run on every step, few."""
        on, off = g.branch(), g.branch()
        stats = []
        for h, full in pairs:
            stats += on.op(similarity_onnx.OP, h, full, self.valid_f, domain=similarity_onnx.DOMAIN, n_out=2)
        return g.op("If", cond, hint="stats",
                    then_branch=on.subgraph("stats", [on.op("Concat", *stats, axis=1)], [FLOAT]),
                    else_branch=off.subgraph("no_stats", [off.op("Identity", self._nan(2 * len(pairs)))], [FLOAT]))

    def _nan(self, width: int) -> str:
        """A [B, width] tensor of NaN (the stats of sublayers that did not run)."""
        if width not in self._nans:
            g = self.g
            self._nans[width] = g.op("Expand", g.const(math.nan, np.float32),
                                     g.op("Concat", self.dims.batch, g.const([width]), axis=0))
        return self._nans[width]

    def _flush_stats(self) -> None:
        if self._pending_stats:
            first, last = self._pending_stats[0][0], self._pending_stats[-1][0]
            with self.g.scope(f"/stats/sublayers.{first}-{last}"):
                self._stats.append(self._similarity(self.g, [(h, full) for _, h, full in self._pending_stats]))
            self._pending_stats = []

    # -- sublayers ---------------------------------------------------------------------------------------------------
    def _ffn(self, g: Graph, h: str, i: int) -> tuple[str, list[str]]:
        ops = self.ops
        gate, up = self.lowering.gate_up(g, self.lowering.input_norm(g, h, f"layers.{i}.ffn_norm"), i)
        act = ACTIVATIONS[self.spec.activation](g, gate)
        return ops.post_norm(g, ops.linear(g, g.op("Mul", act, up), i, "down"), i, "ffn_post_norm"), []

    def _next_norm(self, j: int) -> str | None:
        """Weight role of the norm that sublayer j+1 applies to sublayer j's output, if j+1 runs at all."""
        if j + 1 >= self.spec.num_sublayers or self.roles[j + 1] == "never":
            return None
        return f"layers.{(j + 1) // 2}.{'attn_norm' if (j + 1) % 2 == 0 else 'ffn_norm'}"

    def _stand_in(self, g: Graph, h: str, j: int, scale: str) -> str:
        """What skipped sublayer j outputs (adaskip.plan.Compensation is the rule): the plan's per-channel
        scale * h + shift, baked into the graph, where it has one; otherwise the runtime's scalar scale * h."""
        comp = self.layout.compensation
        if comp is None or j not in comp.sublayers:
            return g.op("Mul", h, scale)
        vec_scale, vec_shift = comp.sublayers[j]
        if len(vec_scale) != self.spec.hidden_size or len(vec_shift) != self.spec.hidden_size:
            raise InputError(f"the plan's compensation for sublayer {j} has {len(vec_scale)} channels; the model has "
                             f"{self.spec.hidden_size}")
        mul = self.ops.tensor(f"stand_in.{j}.scale", lambda: np.asarray(vec_scale, np.float32))
        add = self.ops.tensor(f"stand_in.{j}.shift", lambda: np.asarray(vec_shift, np.float32))
        return g.op("Add", g.op("Mul", h, mul), add)

    def _sublayer(self, j: int, h: str, block: Block) -> tuple[str, list[str]]:
        g, i, role = self.g, j // 2, self.roles[j]
        if role == "always":
            delta, extra = block(g, h, i)
            full = self.lowering.residual(g, h, delta, self._next_norm(j))
            self._pending_stats.append((j, h, full))
            if len(self._pending_stats) == STATS_GROUP:
                self._flush_stats()
            return full, extra
        self._flush_stats()
        scale = g.op("Reshape", g.op("Gather", "scale", g.const(j), axis=1), g.const([-1, 1, 1]))
        if role == "never":
            self._stats.append(self._nan(2))
            return self._stand_in(g, h, j, scale), []
        skip_col = g.op("Gather", "skip", g.const(j), axis=1)
        cond = g.op("Cast", g.op("ReduceMin", g.op("Cast", skip_col, to=INT32), keepdims=0), to=BOOL)
        then_g, else_g = g.branch(), g.branch()
        scaled_t = self._stand_in(then_g, h, j, scale)
        then_extra = self.lowering.skipped_kv(then_g) if j % 2 == 0 and i in self.cached else []
        # without nested Ifs the branch passes `full` out and the stats If follows this one (same results)
        flat = not self.lowering.nested_ifs
        then_outs = [then_g.op("Identity", scaled_t), then_g.op("Identity", scaled_t if flat else self._nan(2))]
        then_outs += then_extra
        delta, extra = block(else_g, h, i)
        full = else_g.op("Add", h, delta)
        stats = else_g.op("Identity", full) if flat else self._similarity(else_g, [(h, full)])
        mixed = else_g.op("Where", else_g.op("Reshape", skip_col, g.const([-1, 1, 1])),
                          self._stand_in(else_g, h, j, scale), full)
        else_outs = [mixed, stats] + [else_g.op("Identity", e) for e in extra]
        types = [FLOAT] * len(then_outs)
        outs = g.op("If", cond, n_out=len(then_outs), hint=f"sub{j}",
                    then_branch=then_g.subgraph(f"skip_{j}", then_outs, types),
                    else_branch=else_g.subgraph(f"run_{j}", else_outs, types))
        if flat:  # stats of the rows that ran, when asked for and some row ran (as the nested form computes them)
            outs[1] = self._similarity(g, [(h, outs[1])], cond=g.op("And", "want_stats", g.op("Not", cond)))
        self._stats.append(outs[1])
        return outs[0], outs[2:]

    # -- the whole graph ---------------------------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        spec, g, lowering = self.spec, self.g, self.lowering
        n = spec.num_sublayers
        with g.scope("/embed"):
            h = g.op("Gather", "embed", "input_ids")
            if spec.embed_scale != 1.0:  # scaled in float32, as the reference does
                h = g.op("Mul", h, g.const(spec.embed_scale, np.float32))
        kv_outputs = []
        for i in range(spec.num_layers):
            for j, block, name in ((2 * i, lowering.attention, "attn"), (2 * i + 1, self._ffn, "ffn")):
                if j == lowering.tail_start:
                    self._flush_stats()  # the stats so far average over every token
                    with g.scope("/tail"):
                        h, self.valid_f = lowering.enter_tail(g, h, self.valid_f)
                with g.scope(f"/layers.{i}/{name}"):
                    h, extra = self._sublayer(j, h, block)
                    if extra:
                        out_k, out_v = lowering.kv_names(i)
                        g.op("Identity", extra[0], outputs=[out_k])
                        g.op("Identity", extra[1], outputs=[out_v])
                        kv_outputs.append(i)
        self._flush_stats()
        with g.scope("/stats"):
            pairs = g.op("Reshape", g.op("Concat", *self._stats, axis=1), g.const([0, n, 2]))
            sim, ratio = g.op("Split", pairs, axis=2, n_out=2)
            g.op("Squeeze", sim, g.const([2]), outputs=["similarity"])
            g.op("Squeeze", ratio, g.const([2]), outputs=["norm_ratio"])
        with g.scope("/lm_head"):
            if self.all_logits:
                self._all_logits(h)
            else:
                lowering.last_logits(g, h)
        return self._model(kv_outputs)

    def _all_logits(self, h: str) -> None:
        """`logits` [B, T, V] of every position."""
        g, ops, spec = self.g, self.ops, self.spec
        head = ops.weight("lm_head" if "lm_head" in ops.w else "embed")
        flat = g.op("Reshape", ops.norm(g, h, "final_norm"), g.const([-1, spec.hidden_size]))
        logits = g.op("Gemm", flat, head, transB=1)
        g.op("Reshape", logits, g.op("Concat", self.dims.batch, self.dims.tokens, g.const([spec.vocab_size]), axis=0),
             outputs=["logits"])

    def _model(self, kv_outputs: list[int]) -> onnx.ModelProto:
        spec, g, lowering, n = self.spec, self.g, self.lowering, self.spec.num_sublayers
        info = helper.make_tensor_value_info
        inputs = [info("input_ids", INT64, ["batch", "seq"]), info("position_ids", INT64, ["batch", "seq"]),
                  info("token_valid", BOOL, ["batch", "seq"])]
        inputs += lowering.inputs()
        inputs += [info("skip", BOOL, ["batch", n]), info("scale", FLOAT, ["batch", n]), info("want_stats", BOOL, [])]
        outputs = [info("logits", FLOAT, ["batch", "seq", spec.vocab_size] if self.all_logits
                        else ["batch", spec.vocab_size]),
                   info("similarity", FLOAT, ["batch", n]), info("norm_ratio", FLOAT, ["batch", n])]
        for i in kv_outputs:
            past, new = lowering.kv_io(i)
            inputs += past
            outputs += new
        graph = helper.make_graph(g.nodes, "adaskip", inputs, outputs, initializer=g.initializers)
        opsets = [helper.make_opsetid("", OPSET), similarity_onnx.opset_import(), *lowering.opsets]
        model = helper.make_model(graph, opset_imports=opsets, functions=[similarity_onnx.function_proto()],
                                  producer_name="adaskip", doc_string=f"adaskip graph, variant {lowering.variant}")
        model.ir_version = IR_VERSION
        helper.set_model_props(model, {VARIANT_KEY: lowering.variant})
        return model


def build_onnx(spec: ModelSpec, weights: dict[str, torch.Tensor], layout: SkipLayout, *, variant: str,
               all_logits: bool = False, kv_dtype: str = "float32",
               kv_scales: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> onnx.ModelProto:
    """The graph of `variant` (adaskip.export.onnx.variants.choose_variant picks one) for this model and layout;
    `kv_dtype` float16 / int8 keeps the ort variant's KV cache in half precision / int8 with `kv_scales` per cached
    layer (adaskip.calibrate.kv_scales); attention still computes in float32."""
    return GraphBuilder(spec, weights, layout, variant, all_logits, kv_dtype, kv_scales).build()
