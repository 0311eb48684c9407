"""The node list an adaskip graph is written into: fresh tensor names, constants and weights kept once in the main
graph (If branches read them from there), and node names scoped by where they sit (`/layers.3/attn/MatMul_12`), so
a graph reads layer by layer in Netron and a parser's error names the sublayer."""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9
NEG = float(np.finfo(np.float32).min)
FLOAT, INT32, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL


class Graph:
    """Node list for the main graph or an If branch (`branch()`); constants and weights always live in the main
    graph, and one counter names every tensor and node of the model."""

    def __init__(self, root: "Graph | None" = None):
        self.nodes: list[onnx.NodeProto] = []
        self.root = root or self
        if root is None:
            self.initializers: list[onnx.TensorProto] = []
            self._ids = itertools.count()
            self._consts: dict[tuple, str] = {}
            self._scope = ""

    def branch(self) -> "Graph":
        """An empty If branch of this model."""
        return Graph(self.root)

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Name the nodes added inside `with` as `{name}/{op}_{n}` (name like "/layers.3/attn"), in branches too."""
        root = self.root
        outer, root._scope = root._scope, name
        try:
            yield
        finally:
            root._scope = outer

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self.root._ids)}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "", hint: str | None = None,
           outputs: list[str] | None = None, **attrs) -> str | list[str]:
        outs = outputs or [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        name = self.root._scope + ("/" if self.root._scope else "") + self.fresh(op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain, **attrs))
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

    def subgraph(self, name: str, outs: list[str], types: list[int]) -> onnx.GraphProto:
        """This branch as an If's then/else graph with outputs `outs`."""
        return helper.make_graph(self.nodes, name, [],
                                 [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types)])
