"""Parse the portable ONNX graph into a TensorRT network, and describe what the network contains.

The parser maps each ONNX `If` to an IIfConditional and, with the plugin override on, each `ai.adaskip::IOSimilarity`
node to our plugin instead of its function body. A graph it cannot read fails with the parser's own messages.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from adaskip.runtime.trt.lib import TensorRT, TensorRTError, errors_of, warnings_of
from adaskip.runtime.trt.plugin import PLUGIN_NAME, register_plugin

_SUBLAYER_OUTPUT = re.compile(r"sub(\d+)_")  # the graph builder names a sublayer conditional's outputs sub{j}_*
_STATS_OUTPUT = "stats"  # ... and the IOSimilarity conditionals' outputs stats_*


@dataclass
class ParsedNetwork:
    builder: Any
    network: Any
    parser: Any  # the network references the parser's weights: keep it alive as long as the network
    plugin_override: bool  # False: IOSimilarity was imported as its ONNX function body (older TensorRT)
    plugin_creator: str  # "python" (adaskip/runtime/trt/plugin.py) or "registered" (e.g. the C++ plugin library)
    warnings: list[str] = field(default_factory=list)


def input_axes(onnx_path: Path) -> dict[str, list[int | str]]:
    """Each graph input's dims: an int, or the name of the dynamic axis (read without loading the weights)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                     for d in i.type.tensor_type.shape.dim] for i in graph.input}


def parse_onnx(env: TensorRT, onnx_path: Path) -> ParsedNetwork:
    trt = env.trt
    creator = register_plugin(env)
    override = getattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE", None)
    with env.logger.capture() as messages:
        builder = trt.Builder(env.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, env.logger)
        if override is not None:
            parser.set_flag(override)
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        details = [_describe(parser.get_error(i)) for i in range(parser.num_errors)] or errors_of(messages)
        raise TensorRTError(f"TensorRT's ONNX parser ({env.flavour} {env.version}) cannot parse the graph "
                            f"{onnx_path.name}:\n  " + "\n  ".join(details or ["(no message)"]))
    origin = "python" if type(creator).__module__ == register_plugin.__module__ else "registered"
    return ParsedNetwork(builder, network, parser, override is not None, origin, warnings_of(messages))


def _describe(err: Any) -> str:
    where = f"node {err.node_name() or err.node()} ({err.node_operator()}): " if err.node() >= 0 else ""
    return f"{where}{err.code().name} ({err.func()}: {err.desc()})"


def _as(layer: Any, cls: Any) -> Any:
    layer.__class__ = cls  # the Python API returns ILayer; the concrete interface is chosen by type (as Polygraphy)
    return layer


def describe_network(env: TensorRT, network: Any) -> dict[str, Any]:
    """Layer counts, the conditionals (per dynamic sublayer / per similarity computation), the plugin layers and
    which conditional each sits in, the inputs (KV only for live attention layers) and outputs."""
    trt = env.trt
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    types = Counter(layer.type.name for layer in layers)
    producer = {layer.get_output(k).name: layer for layer in layers for k in range(layer.num_outputs)}
    outputs_of: dict[str, list[str]] = {}  # conditional -> its output tensor names
    conditions: dict[str, str] = {}  # conditional -> the tensor it branches on
    for layer in layers:
        if layer.type == trt.LayerType.CONDITIONAL_OUTPUT:
            out = _as(layer, trt.IIfConditionalOutputLayer)
            outputs_of.setdefault(out.conditional.name, []).append(out.get_output(0).name)
        elif layer.type == trt.LayerType.CONDITION:
            cond = _as(layer, trt.IConditionLayer)
            conditions[cond.conditional.name] = cond.get_input(0).name

    def kind(conditional: str) -> str:
        names = outputs_of.get(conditional, [])
        if names and all(n.startswith(_STATS_OUTPUT) for n in names):
            return "stats"
        m = _SUBLAYER_OUTPUT.match(names[0]) if names else None
        return f"sublayer:{m.group(1)}" if m else "other"

    kinds = {c: kind(c) for c in conditions}
    plugins: Counter = Counter()
    plugins_in_stats = 0
    for layer in layers:
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        plugin = _as(layer, trt.IPluginV3Layer).plugin
        plugins[plugin.get_capability_interface(trt.PluginCapabilityType.CORE).plugin_name] += 1
        feeders = [producer.get(layer.get_input(k).name) for k in range(layer.num_inputs)]
        inside = {_as(f, trt.IIfConditionalInputLayer).conditional.name for f in feeders
                  if f is not None and f.type == trt.LayerType.CONDITIONAL_INPUT}
        plugins_in_stats += bool(inside) and all(kinds.get(c) == "stats" for c in inside)
    inputs = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        inputs[t.name] = {"shape": list(t.shape), "dtype": t.dtype.name}
    kv = sorted(int(m.group(1)) for n in inputs if (m := re.fullmatch(r"past_key_(\d+)", n)))
    return {
        "layers": len(layers),
        "layer_types": dict(sorted(types.items())),
        "conditionals": {"total": len(conditions),
                         "sublayers": sorted(int(k.split(":")[1]) for k in kinds.values() if k.startswith("sublayer:")),
                         "stats": sum(k == "stats" for k in kinds.values()),
                         # directly on the want_stats input (sublayers that always run); the others branch on
                         # want_stats AND "some row ran" after their sublayer's conditional (no nesting)
                         "stats_on_want_stats": sum(k == "stats" and conditions[c] == "want_stats"
                                                    for c, k in kinds.items()),
                         "other": sum(k == "other" for k in kinds.values())},
        "plugins": {"layers": dict(plugins), f"{PLUGIN_NAME}_in_stats_conditionals": plugins_in_stats},
        "inputs": inputs,
        "outputs": [network.get_output(i).name for i in range(network.num_outputs)],
        "kv_layers": kv,
    }
