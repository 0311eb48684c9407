"""The IOSimilarity plugin for TensorRT's Python API: a class-based IPluginV3 and its creator.

    IOSimilarity(h_in [B,T,D], h_out [B,T,D], valid [B,T]) -> similarity [B,1], norm_ratio [B,1]

Name "IOSimilarity", version "1", namespace "" — the ONNX node `ai.adaskip::IOSimilarity` resolves to it by name
(the parser's plugin override), and the C++ plugin in cpp/plugins registers the same triple with the same field,
so an engine built with one deserializes with the other. Semantics: adaskip/export/onnx/similarity_op.py; the math is
adaskip.similarity.io_similarity (the one definition every backend reproduces), run with torch on the CUDA buffers
TensorRT hands to enqueue, accumulating in fp32 whatever the tensor type (fp32, fp16, bf16; linear layout).

Field: `eps` (float32), serialized with the engine; not advertised to the parser (the ONNX op has no attributes).
TensorRT calls these methods from C++: an exception escaping clone() or create_plugin() can take the process down,
so they return None / False on bad input and report through the logger instead.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from adaskip.similarity import EPS, io_similarity
from adaskip.runtime.trt.lib import TensorRT, TensorRTError

PLUGIN_NAME = "IOSimilarity"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
EPS_FIELD = "eps"
NUM_INPUTS, NUM_OUTPUTS = 3, 2


def similarity_stats(h_in: torch.Tensor, h_out: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What enqueue computes, on any device: (similarity, norm_ratio), each [B, 1] in h_in's dtype."""
    s, r = io_similarity(h_in, h_out, valid)  # fp32 math; `valid` may be a float mask
    return s.unsqueeze(1).to(h_in.dtype), r.unsqueeze(1).to(h_in.dtype)


class _CudaBuffer:
    """A device buffer TensorRT owns, described by __cuda_array_interface__ so torch wraps it without a copy."""

    def __init__(self, pointer: int, shape: tuple[int, ...], typestr: str):
        self.__cuda_array_interface__ = {"data": (pointer, False), "shape": shape, "typestr": typestr,
                                         "strides": None, "version": 3}


def _device_tensor(trt: Any, pointer: int, desc: Any) -> torch.Tensor:
    shape = tuple(int(d) for d in desc.dims)
    typestr, view = {trt.DataType.FLOAT: ("<f4", None), trt.DataType.HALF: ("<f2", None),
                     trt.DataType.BF16: ("<i2", torch.bfloat16)}[desc.type]  # bf16 has no typestr: view the bits
    t = torch.as_tensor(_CudaBuffer(pointer, shape, typestr), device="cuda")
    return t.view(view) if view is not None else t


@functools.lru_cache(maxsize=None)
def plugin_classes(env: TensorRT) -> tuple[type, type]:
    """The plugin and creator classes for this TensorRT module (they derive from its binding classes)."""
    trt = env.trt
    float_types = (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)

    class IOSimilarityPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, eps: float = EPS):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version, self.plugin_namespace = PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE
            self.num_outputs = NUM_OUTPUTS
            self.timing_cache_id = ""  # every instance times alike: time one, reuse for all
            self.eps = eps

        # -- IPluginV3 --------------------------------------------------------------------------------------------
        def get_capability_interface(self, capability: Any) -> Any:
            return self

        def clone(self) -> Any:
            return IOSimilarityPlugin(self.eps)

        # -- IPluginV3OneBuild -------------------------------------------------------------------------------------
        def get_output_data_types(self, input_types: list) -> list:
            return [input_types[0]] * NUM_OUTPUTS

        def get_output_shapes(self, inputs: list, shape_inputs: list, expr_builder: Any) -> list:
            shape = trt.DimsExprs(2)
            shape[0] = inputs[0][0]  # batch
            shape[1] = expr_builder.constant(1)
            return [shape, trt.DimsExprs(shape)]

        def supports_format_combination(self, pos: int, in_out: list, num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:
                return desc.type in float_types
            first = in_out[0].desc.type
            if pos == 2:  # the validity mask: float32 or the stream's type
                return desc.type in (trt.DataType.FLOAT, first)
            return desc.type == first  # h_out and both outputs follow h_in

        def configure_plugin(self, inputs: list, outputs: list) -> None:
            pass  # shape-independent: nothing to precompute

        def get_workspace_size(self, inputs: list, outputs: list) -> int:
            return 0

        def get_valid_tactics(self) -> list:
            return []

        # -- IPluginV3OneRuntime -----------------------------------------------------------------------------------
        def set_tactic(self, tactic: int) -> None:
            pass

        def on_shape_change(self, inputs: list, outputs: list) -> None:
            pass

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def get_fields_to_serialize(self) -> Any:
            return trt.PluginFieldCollection([trt.PluginField(EPS_FIELD, np.array([self.eps], dtype=np.float32),
                                                              trt.PluginFieldType.FLOAT32)])

        def enqueue(self, input_desc: list, output_desc: list, inputs: list, outputs: list, workspace: int,
                    stream: int) -> None:
            if not torch.cuda.is_available():
                raise RuntimeError("IOSimilarity enqueue needs torch with CUDA (it runs on TensorRT's device buffers)")
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                h_in, h_out, valid = (_device_tensor(trt, p, d) for p, d in zip(inputs, input_desc))
                s, r = similarity_stats(h_in, h_out, valid)
                _device_tensor(trt, outputs[0], output_desc[0]).copy_(s)
                _device_tensor(trt, outputs[1], output_desc[1]).copy_(r)

    class IOSimilarityCreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE
            self.field_names = trt.PluginFieldCollection([])  # the ONNX op has no attributes

        def create_plugin(self, name: str, fields: Any, phase: Any) -> Any:
            eps = EPS
            for f in fields:  # build phase: the node's attributes (none); runtime: get_fields_to_serialize()
                if f.name == EPS_FIELD:
                    eps = float(np.asarray(f.data).reshape(-1)[0])
            # the math is adaskip.similarity's, whose eps is fixed: an engine serialized with another eps (the C++
            # plugin accepts any) cannot be reproduced here; returning None makes TensorRT report the failure
            if not np.isclose(eps, EPS, rtol=1e-6, atol=0.0):
                env.logger.log(trt.ILogger.Severity.ERROR,
                               f"{PLUGIN_NAME}: eps={eps} is not supported by the Python plugin (only {EPS})")
                return None
            return IOSimilarityPlugin(eps)

    return IOSimilarityPlugin, IOSimilarityCreator


_registered: dict[int, Any] = {}  # id(module) -> creator, kept alive: the registry holds a raw pointer


def register_plugin(env: TensorRT) -> Any:
    """Register the creator with the plugin registry once per process (before parsing or deserializing)."""
    key = id(env.trt)
    if key in _registered:
        return _registered[key]
    registry = env.trt.get_plugin_registry()
    existing = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if existing is not None:  # e.g. the C++ plugin library was loaded first: same name, version and field
        _registered[key] = existing
        return existing
    creator = plugin_classes(env)[1]()
    if not registry.register_creator(creator, PLUGIN_NAMESPACE):
        raise TensorRTError(f"TensorRT refused to register the {PLUGIN_NAME} plugin creator")
    _registered[key] = creator
    return creator
