"""Writing a built graph into an engine directory: model.onnx + model.onnx.data, checked in full, and the manifest's
record of it."""

from __future__ import annotations

from pathlib import Path

import onnx

from adaskip.export.onnx.nodes import OPSET
from adaskip.export.onnx.variants import VARIANT_KEY
from adaskip.runtime.engine import GRAPH_INTERFACE

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def save_onnx(model: onnx.ModelProto, out_dir: str | Path, check: bool = True) -> dict:
    """Write model.onnx + model.onnx.data (weights as external data) and run the full checker on the result.
    Returns the manifest's graph record: files, opset, interface, the variant the builder recorded, KV layers and
    the number of conditional sublayers."""
    props = {p.key: p.value for p in model.metadata_props}
    if VARIANT_KEY not in props:
        raise ValueError(f"not a graph from adaskip.export.onnx.graph.build_onnx (no {VARIANT_KEY} property)")
    out = Path(out_dir)
    onnx.save_model(model, str(out / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    if check:
        onnx.checker.check_model(str(out / MODEL_FILE), full_check=True)
    kv = sorted(int(i.name.rsplit("_", 1)[1]) for i in model.graph.input if i.name.startswith("past_key_"))
    ifs = sum(1 for node in model.graph.node if node.op_type == "If" and node.output[0].startswith("sub"))  # sublayers
    return {"file": MODEL_FILE, "data": DATA_FILE, "opset": OPSET, "interface": GRAPH_INTERFACE,
            "variant": props[VARIANT_KEY], "kv_layers": kv, "conditionals": ifs}
