"""Weight-only int4 quantization of a saved graph with ONNX Runtime's MatMulNBits."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from adaskip.export.onnx.save import DATA_FILE, MODEL_FILE

QUANTIZE_CHOICES = ("int4",)


def quantize_int4(model_dir: str | Path, block_size: int = 32) -> dict:
    """Weight-only int4 (ONNX Runtime's MatMulNBits, symmetric, int8 activations) for every linear layer, inside
    the If branches too; attention products and the tied embedding / LM head stay fp32. ORT-specific: the result
    uses a com.microsoft op, so it is an ONNX Runtime engine, not the portable graph."""
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
