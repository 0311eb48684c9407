"""Which engine class runs which engine directory: one table keyed by (backend, graph variant).

The loader opens engine dirs through it and adaskip-bench builds its columns through it, so a new backend or graph
variant is one row here. The graph variant itself is decided once, at export (adaskip/export/onnx/), and recorded in
the manifest; nothing here re-derives it.
"""

from __future__ import annotations

from typing import Any

from adaskip.engine_dir import EngineDir
from adaskip.errors import EngineDirError, InputError
from adaskip.runtime.ort_engines import OrtGqaEngine, OrtPortableEngine
from adaskip.runtime.torch_engine import TorchEngine
from adaskip.runtime.trt.engine import TrtEngine

# (backend, graph variant or None) -> the engine class
ENGINES: dict[tuple[str, str | None], type] = {
    ("torch", None): TorchEngine,
    ("ort", "portable"): OrtPortableEngine,
    ("ort", "ort"): OrtGqaEngine,
    ("tensorrt", "portable"): TrtEngine,
}


def engine_class(backend: str, variant: str | None) -> type:
    cls = ENGINES.get((backend, variant))
    if cls is None:
        raise EngineDirError(f"no engine in this build of adaskip runs backend {backend!r} with graph variant "
                             f"{variant!r}")
    return cls


def graph_variant(ed: EngineDir) -> str | None:
    """The graph variant an engine directory's manifest records (None for the torch engine)."""
    return {"torch": None, "tensorrt": "portable"}.get(ed.backend, ed.manifest["build"].get("graph", {}).get("variant"))


def supports_slots(ed: EngineDir) -> bool:
    """Whether the engine runs rows in their own KV slots (what the in-flight batching scheduler needs)."""
    return bool(getattr(ENGINES.get((ed.backend, graph_variant(ed))), "supports_slots", False))


def open_engine(ed: EngineDir, threads: int | None = None, spinning: bool | None = None) -> Any:
    """The engine for an opened engine directory (its manifest names the backend and the graph variant).
    `spinning`: ONNX Runtime's intra-op spinning (None: ADASKIP_SPINNING, else off); other backends refuse it."""
    if ed.backend == "trtllm-checkpoint":
        raise EngineDirError(f"{ed.root} is a TensorRT-LLM checkpoint, not an engine adaskip runs: build it with "
                             f"trtllm-build (see {ed.root / 'manifest.json'} and docs/trtllm-checkpoint.md)")
    variant = graph_variant(ed)
    if (ed.backend, variant) not in ENGINES:
        raise EngineDirError(f"{ed.root}: backend {ed.backend!r} (graph variant {variant!r}) is not available in this "
                             f"build of adaskip")
    if spinning is not None and ed.backend != "ort":
        raise InputError(f"--spinning sets ONNX Runtime's intra-op threads; {ed.root} is a {ed.backend} engine")
    ort_only = {} if spinning is None else {"spinning": spinning}  # only the ONNX Runtime engines take it
    return ENGINES[(ed.backend, variant)].from_engine_dir(ed, threads=threads, **ort_only)
