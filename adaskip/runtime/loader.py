"""Open an engine directory and assemble engine + policy + tokenizer + Generator."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaskip.engine_dir import TOKENIZER, EngineDir, open_engine_dir
from adaskip.errors import EngineDirError
from adaskip.model.tokenizer import open_tokenizer
from adaskip.policy import SkipPolicy
from adaskip.runtime.generate import Generator
from adaskip.runtime.registry import open_engine


@dataclass
class Runtime:
    engine_dir: EngineDir
    engine: Any
    policy: SkipPolicy
    tokenizer: Any
    generator: Generator


def load_runtime(path: str | Path, threads: int | None = None, spinning: bool | None = None) -> Runtime:
    ed = open_engine_dir(path)
    engine = open_engine(ed, threads=threads, spinning=spinning)
    tokenizer = open_tokenizer(ed.root / TOKENIZER)
    policy = SkipPolicy(ed.plan)
    check_plan_matches_graph(ed, policy, engine)
    eos = tuple(ed.manifest.get("tokenizer", {}).get("eos_token_ids", []))
    return Runtime(ed, engine, policy, tokenizer, Generator(engine, policy, tokenizer, eos))


def check_plan_matches_graph(ed: EngineDir, policy: SkipPolicy, engine: Any) -> None:
    """A graph bakes the plan's roles in (which sublayers are removed, fixed or conditional; which layers keep KV):
    refuse a plan.json that is not the one the graph was built from instead of running it with wrong results."""
    layout = policy.layout
    kv = getattr(engine, "kv_layers", None)
    if kv is not None and list(kv) != list(layout.cached_layers):
        raise EngineDirError(f"{ed.root}: the graph keeps KV for layers {list(kv)}, the plan needs "
                             f"{list(layout.cached_layers)}: plan.json is not the plan this engine was built with")
    graph = ed.manifest["build"].get("graph", {})
    dynamic = {j for j, role in enumerate(layout.roles) if role == "dynamic"}
    if graph.get("file") in ed.manifest["files"]:
        baked = conditional_sublayers(ed.root / graph["file"])
        if baked != dynamic:
            raise EngineDirError(f"{ed.root}: the graph has conditionals for sublayers {sorted(baked)}, the plan needs "
                                 f"them for {sorted(dynamic)}: plan.json is not the plan this engine was built with")
    elif "conditionals" in graph and graph["conditionals"] != len(dynamic):
        raise EngineDirError(f"{ed.root}: the graph has {graph['conditionals']} conditional sublayers, the plan needs "
                             f"{len(dynamic)}: plan.json is not the plan this engine was built with")


def conditional_sublayers(graph_path: Path) -> set[int]:
    """Sublayers j the ONNX graph computes under an If: the exporter names such an If's outputs sub{j}_*."""
    import onnx

    try:
        model = onnx.load(str(graph_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise EngineDirError(f"{graph_path} is not a readable ONNX graph: {e}") from None
    return {int(m.group(1)) for node in model.graph.node if node.op_type == "If"
            for m in [re.match(r"sub(\d+)_", node.output[0] if node.output else "")] if m}
