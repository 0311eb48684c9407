"""IOSimilarity as an ONNX function in the custom domain `ai.adaskip`.

    IOSimilarity(h_in [B,T,D], h_out [B,T,D], valid [B,T] float) -> (similarity [B,1], norm_ratio [B,1])

(The trailing 1 lets a graph concatenate the per-sublayer results into [B, 2L] without reshaping each.)

The body is the rule in adaskip/similarity.py written in standard ONNX ops, so ONNX Runtime (which inlines model-
local functions) runs it as is, and TensorRT can map the node to a plugin instead.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "ai.adaskip"
OP = "IOSimilarity"
OPSET = 17
EPS = 1e-12


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def function_proto() -> onnx.FunctionProto:
    n = helper.make_node
    nodes = [
        _const("last", np.array([-1], dtype=np.int64)),
        _const("eps", np.array(EPS, dtype=np.float32)),
        _const("one", np.array(1.0, dtype=np.float32)),
        n("Mul", ["h_in", "h_out"], ["prod"]),
        n("ReduceSum", ["prod", "last"], ["dot"], keepdims=0),  # [B,T]
        n("Mul", ["h_in", "h_in"], ["sq_in"]),
        n("ReduceSum", ["sq_in", "last"], ["n_in"], keepdims=0),
        n("Mul", ["h_out", "h_out"], ["sq_out"]),
        n("ReduceSum", ["sq_out", "last"], ["n_out"], keepdims=0),
        n("Sqrt", ["n_in"], ["len_in"]),
        n("Sqrt", ["n_out"], ["len_out"]),
        n("Mul", ["len_in", "len_out"], ["lens"]),
        n("Max", ["lens", "eps"], ["lens_safe"]),
        n("Div", ["dot", "lens_safe"], ["cos"]),
        n("Mul", ["cos", "valid"], ["cos_valid"]),
        n("ReduceSum", ["cos_valid", "last"], ["cos_sum"], keepdims=1),  # [B, 1]
        n("ReduceSum", ["valid", "last"], ["count"], keepdims=1),
        n("Max", ["count", "one"], ["count_safe"]),
        n("Div", ["cos_sum", "count_safe"], ["similarity"]),
        n("Mul", ["n_out", "valid"], ["out_valid"]),
        n("ReduceSum", ["out_valid", "last"], ["out_sum"], keepdims=1),
        n("Mul", ["n_in", "valid"], ["in_valid"]),
        n("ReduceSum", ["in_valid", "last"], ["in_sum"], keepdims=1),
        n("Max", ["in_sum", "eps"], ["in_safe"]),
        n("Div", ["out_sum", "in_safe"], ["ratio_sq"]),
        n("Sqrt", ["ratio_sq"], ["norm_ratio"]),
    ]
    return helper.make_function(DOMAIN, OP, ["h_in", "h_out", "valid"], ["similarity", "norm_ratio"], nodes,
                                opset_imports=[helper.make_opsetid("", OPSET)])


def opset_import() -> onnx.OperatorSetIdProto:
    return helper.make_opsetid(DOMAIN, 1)


FLOAT = TensorProto.FLOAT
