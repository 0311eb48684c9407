"""Weight-only quantization of a saved graph with ONNX Runtime's MatMulNBits (int4 or int8 blocks).

Every linear layer is quantized, inside the If branches too, and so is the LM head: with a tied embedding the head
gets its own [hidden, vocab] initializer first (the fp32 graph transposes the embedding at session load instead), so
the embedding's Gather keeps reading the fp32 table while a decode step reads the head at 4 or 8 bits. Attention
products, norms and the KV cache are not touched here.

Why MatMulNBits for int8 too (one [576 x 49152] / [576 x 1536] / [1536 x 576] product, M = 1, 2 threads, ONNX
Runtime 1.32 on this AVX2 machine; docs/benchmarks.md): bits=8 with accuracy_level 4 (int8 activations) ran in
0.58x / 0.82x / 0.53x of fp32 with ~15x less output error than int4. A QDQ graph (DequantizeLinear -> MatMul) ran at
the same speed and error: ONNX Runtime fuses it into MatMulNBits bits=8 itself (checked in its optimized graph). Dynamic
quantization (DynamicQuantizeMatMul) was faster (0.38x on the head) but its per-tensor uint8 activations gave int4's
error at twice int4's bytes. accuracy_level must be 4: bits=8 at level 0 dequantizes to fp32 and ran 20-90x slower.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from adaskip.export.onnx.save import DATA_FILE, MODEL_FILE

QUANTIZE_CHOICES = ("int4", "int8")
BITS = {"int4": 4, "int8": 8}
HEAD_WEIGHT = "lm_head_t"  # the untied head's [hidden, vocab] initializer


def untie_head(model: onnx.ModelProto) -> bool:
    """Give the LM head MatMul (output `logits`) a constant [hidden, vocab] weight where it reads a Transpose of the
    embedding, so a weight quantizer can take it; the Transpose goes when nothing else reads it. Returns whether the
    graph changed (an untied model's head is an initializer already)."""
    graph = model.graph
    head = next((n for n in graph.node if n.op_type == "MatMul" and "logits" in n.output), None)
    if head is None:
        return False
    producer = next((n for n in graph.node if head.input[1] in n.output), None)
    inits = {t.name: t for t in graph.initializer}
    if producer is None or producer.op_type != "Transpose" or producer.input[0] not in inits:
        return False
    table = numpy_helper.to_array(inits[producer.input[0]])
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), HEAD_WEIGHT))
    head.input[1] = HEAD_WEIGHT
    readers = [n for n in graph.node if producer.output[0] in n.input]
    if not readers:
        graph.node.remove(producer)
    return True


def quantize(model_dir: str | Path, kind: str, block_size: int = 32) -> dict:
    """Quantize the graph in `model_dir` in place: `kind` int4 or int8 weight-only MatMulNBits (symmetric, blocks of
    `block_size` along K, int8 activations in the kernel) for every linear layer and the LM head. ORT-specific: the
    result uses a com.microsoft op, so it is an ONNX Runtime engine, not the portable graph."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if kind not in BITS:
        raise ValueError(f"unknown quantization {kind!r}; choose from {', '.join(QUANTIZE_CHOICES)}")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    path = Path(model_dir) / MODEL_FILE
    model = onnx.load(str(path))
    untied = untie_head(model)
    quantizer = MatMulNBitsQuantizer(model, bits=BITS[kind], block_size=block_size, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    (Path(model_dir) / DATA_FILE).unlink()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=True)
    quantized = sum(n.op_type == "MatMulNBits" for n in all_nodes(quantizer.model.model.graph))
    return {"quantize": kind, "bits": BITS[kind], "block_size": block_size, "op": "com.microsoft::MatMulNBits",
            "lm_head": "quantized" + (" (own copy of the tied embedding)" if untied else ""),
            "quantized_matmuls": quantized}


def quantize_int4(model_dir: str | Path, block_size: int = 32) -> dict:
    """int4 weight-only quantization (see quantize)."""
    return quantize(model_dir, "int4", block_size)


# element types narrower than a byte -> their bits (the newer ones only where the installed onnx knows them)
_SUB_BYTE_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
                  (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
                  if hasattr(onnx.TensorProto, name)}


def element_bytes(elem_type: int) -> float:
    """Bytes one element of an ONNX tensor type takes (4-bit types: half a byte; MatMulNBits packs its weights into
    uint8, one byte per element of the stored tensor)."""
    if elem_type in _SUB_BYTE_BITS:
        return _SUB_BYTE_BITS[elem_type] / 8
    return float(onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize)


def initializer_bytes(tensor: onnx.TensorProto) -> float:
    """Bytes an initializer holds, from its metadata (the weights themselves need not be loaded)."""
    return math.prod(tensor.dims) * element_bytes(tensor.data_type)


def all_nodes(graph: onnx.GraphProto):
    """Every node of `graph`, those inside If/Loop subgraphs included (the conditional sublayers live there)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)
