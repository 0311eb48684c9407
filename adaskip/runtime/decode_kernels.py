"""adaskip's own ONNX Runtime kernels for decode steps (cpp/ortops, built with CMake), used by the `ort` variant.

ONNX Runtime 1.32's CPU GroupQueryAttention computes each query head on its own, so a decode step reads each KV
head's cache once per query head of its group (3x for SmolLM2) and reaches 14-22 GB/s. cpp/ortops's
DecodeGroupQueryAttention takes the same inputs and attributes; a step of one new token per row runs on its kernel,
which reads each KV head's cache once for its whole group, and a step of more (a prompt chunk) is handed to ONNX
Runtime's own GroupQueryAttention (its tiled prompt attention). A float16 cache (--kv-dtype float16) is read as
float16 and widened in registers; ONNX Runtime has no CPU kernel for float queries over it and widens the whole
buffer every step. The engine loads the graph with its attention nodes
swapped (`decode_graph`) into its one session: same weights file, same KV buffers, the weights held once.

Turned on by naming the library: ADASKIP_DECODE_KERNELS=/path/to/libadaskip_ortops.so (or the engine's
`decode_kernels` argument). Unset or empty: ONNX Runtime's own kernels only.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import helper

from adaskip.errors import InputError

ENV = "ADASKIP_DECODE_KERNELS"
DOMAIN = "com.adaskip"
DECODE_OP = "DecodeGroupQueryAttention"
DECODE_FILE = "model.decode.onnx"  # an engine dir's graph with the op swapped in (write_decode_graph)
_CACHE_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)  # int8 caches carry scales it has no input for
_DECODE_INPUTS = 10  # GroupQueryAttention's query ... position_ids: what the op takes (it refuses the attributes it
# does not implement itself, when the session loads)
BUILD_HINT = ("build it with `cmake -S . -B build -DADASKIP_BUILD_PLUGINS=OFF && cmake --build build --target "
              "adaskip_ortops` (build/lib/libadaskip_ortops.so)")


def kernel_library(path: str | Path | None = None) -> Path | None:
    """The custom-op library to load: `path` where given, else $ADASKIP_DECODE_KERNELS; None when neither names one."""
    value = os.environ.get(ENV, "") if path is None else str(path)
    if not value:
        return None
    library = Path(value)
    if not library.is_file():
        source = ENV if path is None else "decode_kernels"
        raise InputError(f"{source} names {value!r}, which is not a file; {BUILD_HINT}")
    return library


def decode_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an `ort` variant graph whose GroupQueryAttention nodes (If branches included) run cpp/ortops's op.
    The caller's model is not changed. InputError when the graph has what the kernel has no input for (an int8 KV
    cache, its scales); attributes it does not implement (softcap, ...) the kernel refuses when the session loads."""
    caches = {i.name: i.type.tensor_type.elem_type for i in model.graph.input if i.name.startswith("past_")}
    refused = {t for t in caches.values() if t not in _CACHE_TYPES}
    if refused:
        raise InputError(f"{ENV}: the decode kernel reads float32 or float16 KV caches; this engine's are "
                         f"{onnx.helper.tensor_dtype_to_np_dtype(refused.pop())} (--kv-dtype): unset "
                         f"{ENV} for this engine")
    decode = onnx.ModelProto()
    decode.CopyFrom(model)
    if not _swap_attention(decode.graph, _consumed(decode.graph)):
        raise InputError(f"{ENV}: this graph has no GroupQueryAttention node to run on the decode kernel")
    if not any(o.domain == DOMAIN for o in decode.opset_import):
        decode.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return decode


def write_decode_graph(engine_dir: Path, graph: dict) -> None:
    """Writes `decode_graph` of the engine dir's graph (`graph`: the manifest's graph record) beside it as
    DECODE_FILE and records it there as `decode_kernels_file`, for runtimes that load a graph file as it is (the C++
    runtime; the Python engine swaps in memory and needs no file). The file holds the graph only: it reads the same
    external weights file. Nothing is written where the graph cannot take the op (a quantized KV cache)."""
    try:
        swapped = decode_graph(onnx.load(str(engine_dir / graph["file"]), load_external_data=False))
    except InputError:
        return
    onnx.save_model(swapped, str(engine_dir / DECODE_FILE))
    graph["decode_kernels_file"] = DECODE_FILE


def _consumed(graph: onnx.GraphProto) -> set[str]:
    """Every name a node reads or a graph (If / Loop bodies included) returns."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= _consumed(attr.g)
    return names


def _swap_attention(graph: onnx.GraphProto, consumed: set[str]) -> int:
    count = 0
    for node in graph.node:
        for attr in node.attribute:  # If / Loop bodies
            if attr.type == onnx.AttributeProto.GRAPH:
                count += _swap_attention(attr.g, consumed)
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        extra = [name for name in node.input[_DECODE_INPUTS:] if name]
        if extra:
            raise InputError(f"{ENV}: the decode kernel does not take {node.name or 'a GroupQueryAttention node'}'s "
                             f"inputs {', '.join(extra)} (e.g. an engine built with --kv-dtype int8); unset {ENV} for "
                             f"this engine")
        del node.input[_DECODE_INPUTS:]
        if len(node.input) < 4 or not node.input[3]:  # no past: the op cannot infer the present outputs' type (it
            # takes float32 or float16 caches), so those nobody reads are left out (a layer the plan does not cache)
            for i in range(1, len(node.output)):
                if node.output[i] not in consumed:
                    node.output[i] = ""
        node.op_type, node.domain = DECODE_OP, DOMAIN
        count += 1
    return count
