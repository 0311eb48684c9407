"""Which graph variant a model and plan get: the one place that decides (adaskip-build, the bench) and that checks
a requested variant (the graph builder, adaskip-build's early option check).

  portable: standard ONNX ops only, what TensorRT's parser reads; runs anywhere, ONNX Runtime included.
  ort:      ONNX Runtime's contrib ops (GroupQueryAttention over in-place KV buffers, fused residual norms, the
            prefill tail); faster on ONNX Runtime, where the model and plan allow it.
"""

from __future__ import annotations

from adaskip.errors import InputError, check_choice
from adaskip.layout import SkipLayout
from adaskip.model.spec import ModelSpec

VARIANTS = ("portable", "ort")
REQUESTS = ("auto", "ort", "portable")  # auto: the fastest variant the backend, model and plan allow
VARIANT_KEY = "adaskip.graph_variant"  # model metadata: the variant a graph was lowered to (build_onnx records it)


def gqa_supports(spec: ModelSpec) -> bool:
    """ONNX Runtime's GroupQueryAttention needs a head size that is a multiple of 16."""
    return spec.head_dim % 16 == 0


def ort_refusal(spec: ModelSpec, layout: SkipLayout, all_logits: bool = False) -> str | None:
    """Why the ort variant cannot express this model and plan, None where it can. It keeps KV in a buffer shared
    between past and present, written in place: a conditional attention that owns a cache (SkipDecode's set
    growing in decode) cannot write through an If branch. GroupQueryAttention must take the model's heads, and the
    prefill tail computes the last position's logits only."""
    if all_logits or not gqa_supports(spec) or layout.has_conditional_cached_attention:
        return ("the ORT-optimized graph needs last-position logits, a head size that is a multiple of 16 and no "
                "conditional attention that keeps a KV cache (SkipDecode's growing set); use the portable variant")
    return None


def check_kv_cache(spec: ModelSpec, kv_dtype: str, layout: SkipLayout | None = None,
                   variant: str | None = None) -> None:
    """Refuse a KV cache type other than float32 (adaskip-build --kv-dtype) where the graph cannot keep it: only the
    ort variant's GroupQueryAttention can. With the model alone (before a plan exists: adaskip-build checks this
    before calibrating) the head size decides; with the plan's layout, everything ort_refusal weighs; with the
    variant chosen, that variant."""
    if kv_dtype == "float32":
        return
    what = f"--kv-dtype {kv_dtype} keeps the cache in the ort graph variant's GroupQueryAttention"
    if not gqa_supports(spec):
        raise InputError(f"{what}, which needs a head size that is a multiple of 16; this model's is {spec.head_dim}")
    reason = None if layout is None else ort_refusal(spec, layout)
    if reason is not None:
        raise InputError(f"{what}, which this plan cannot use: {reason}")
    if variant is not None and variant != "ort":
        raise InputError(f"{what}; the {variant} variant cannot keep it")


def check_request(backend: str, requested: str) -> None:
    """What a backend accepts whatever the model and plan, so adaskip-build refuses it before loading a model."""
    check_choice(requested, REQUESTS, "--graph-variant")
    if backend == "tensorrt" and requested == "ort":
        raise InputError("--backend tensorrt builds from the portable graph (standard ONNX ops); drop --graph-variant")


def check_variant(spec: ModelSpec, layout: SkipLayout, variant: str, all_logits: bool = False) -> None:
    """Refuse a variant the model and plan cannot have (InputError)."""
    if variant not in VARIANTS:
        raise InputError(f"graph variant must be one of {VARIANTS}; got {variant!r}")
    reason = ort_refusal(spec, layout, all_logits) if variant == "ort" else None
    if reason:
        raise InputError(reason)


def choose_variant(spec: ModelSpec, layout: SkipLayout, backend: str, requested: str = "auto") -> str:
    """The graph variant an ONNX backend ("ort" or "tensorrt") builds: `requested` when given and possible, else
    (auto) the ort variant on ONNX Runtime wherever the model and plan allow it, the portable one otherwise."""
    check_request(backend, requested)
    if requested == "auto":
        return "ort" if backend == "ort" and ort_refusal(spec, layout) is None else "portable"
    check_variant(spec, layout, requested)
    return requested
