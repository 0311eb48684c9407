"""Where a decode step's time goes, against the bytes each op must read (docs/benchmarks.md, "Decode profile").

Runs an `ort`-variant engine dir under ONNX Runtime's profiler: a prompt of --context random tokens (no stats), then
--warmup + --steps decode steps (no stats: the production path after the online window); only the profiled steps'
node events are counted. Per op type (and the --top slowest nodes) it prints the kernel time per step next to the
bytes the op must read from memory each step: its weights (initializers of the optimized graph, as ONNX Runtime runs
it, so fused nodes carry their parts' weights; an embedding Gather reads one row per token) and, for
GroupQueryAttention, the K and V cache up to the current length. "GB/s" is bytes / time; "floor" is bytes / the
machine's read bandwidth, measured as adaskip-bench measures it (adaskip.eval.bench.read_bandwidth_gbs) or given with
--bandwidth.

--rows N profiles a serving step instead: one decode step of N rows over a pool of N KV slots (the scheduler's
`decode_slots`), every row holding the same prompt (weights are read once a step, the KV cache N times).
--decode-kernels LIB profiles the graph with cpp/ortops's attention op, as the engine runs it with
ADASKIP_DECODE_KERNELS (adaskip/runtime/decode_kernels.py).

Usage: python scripts/decode_profile.py ENGINE_DIR [--context 1024] [--steps 16] [--threads 2] [--bandwidth GB/s]
       [--rows 16] [--decode-kernels build/lib/libadaskip_ortops.so]
Run it with OMP_WAIT_POLICY=PASSIVE on a quiet machine; it says the load average it saw.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch

from adaskip.eval.bench import read_bandwidth_gbs
from adaskip.export.onnx.quantize import all_nodes, initializer_bytes
from adaskip.runtime import decode_kernels
from adaskip.runtime.loader import load_runtime
from adaskip.runtime.ort_engines import session_options

def weight_bytes(model: onnx.ModelProto) -> tuple[dict[str, float], dict[str, str]]:
    """Bytes of initializers each node of the (optimized) graph reads per decode token, and each node's op type."""
    sizes = {}
    for t in model.graph.initializer:
        sizes[t.name] = initializer_bytes(t), list(t.dims)
    out, ops = {}, {}
    for node in all_nodes(model.graph):
        total = 0
        for k, name in enumerate(node.input):
            if name not in sizes:
                continue
            size, dims = sizes[name]
            if dims and ((node.op_type in ("Gather", "GatherBlockQuantized") and k == 0)
                         or (node.op_type in ("GroupQueryAttention", decode_kernels.DECODE_OP) and k in (7, 8))):
                size /= dims[0]  # one row of the table per token (embedding; the rotary cos/sin caches)
            total += size
        out[node.name], ops[node.name] = total, node.op_type
    return out, ops


def profile(engine_dir: str, context: int, steps: int, warmup: int, threads: int, rows: int = 1,
            kernels: str | None = None) -> dict:
    # The profile and the optimized graph (a copy of the weights) are read back here and then deleted.
    with tempfile.TemporaryDirectory(prefix="decode-profile-") as work:
        return _profile(engine_dir, context, steps, warmup, threads, rows, kernels, Path(work))


def _profile(engine_dir: str, context: int, steps: int, warmup: int, threads: int, rows: int, kernels: str | None,
             work: Path) -> dict:
    os.environ[decode_kernels.ENV] = kernels or ""
    rt = load_runtime(engine_dir, threads=threads)
    engine, spec = rt.engine, rt.engine.spec
    if not hasattr(engine, "kv_dtype"):
        raise SystemExit(f"{engine_dir}: not an ort-variant engine (GroupQueryAttention); build it with the default "
                         f"graph variant")
    so = session_options(threads)
    so.enable_profiling = True
    so.profile_file_prefix = str(work / "profile")
    so.optimized_model_filepath = str(work / "optimized.onnx")
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    import onnxruntime as ort

    graph_file = Path(engine_dir) / rt.engine_dir.manifest["build"]["graph"]["file"]
    # the engine's own graph (with the decode kernels' op where they are on), in a session that profiles
    engine.session = ort.InferenceSession(engine.session_graph(graph_file, so), so, providers=["CPUExecutionProvider"])
    layout = rt.policy.layout
    n = spec.num_sublayers
    cache = engine.new_cache(rows, context + warmup + steps + 1, list(layout.cached_layers))
    skip, scales = torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n)
    ids = torch.randint(0, spec.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    out = engine.prefill_slot(0, ids[0], cache, skip, scales)
    for buf in (*cache.k.values(), *cache.v.values()):
        buf[1:] = buf[:1]  # every row holds the same prompt
    cache.lengths[:] = context
    token = out.logits.argmax(-1).expand(rows)
    walls = []
    for step in range(warmup + steps):
        t = time.perf_counter()
        out = engine.decode_slots(list(range(rows)), token, cache, skip.expand(rows, -1), scales.expand(rows, -1),
                                  want_stats=False)
        walls.append(time.perf_counter() - t)
        token = out.logits.argmax(-1)
    events = json.load(open(engine.session.end_profiling()))
    runs = [e for e in events if e.get("name") == "model_run"]
    profiled = runs[-steps:]  # the last `steps` runs are the profiled decode steps
    start, stop = profiled[0]["ts"], profiled[-1]["ts"] + profiled[-1]["dur"]
    per_node = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and start <= e["ts"] <= stop:
            per_node[e["name"][: -len("_kernel_time")]] += e["dur"] / steps / 1000  # ms per step
    optimized = onnx.load(str(work / "optimized.onnx"), load_external_data=False)
    weights, op_of = weight_bytes(optimized)
    kv_item = np.dtype(engine.kv_dtype).itemsize
    length = context + warmup + (steps + 1) / 2  # mean cache length over the profiled steps
    kv_per_layer = 2 * spec.num_kv_heads * length * spec.head_dim * kv_item * rows
    nodes = []
    for name, ms in per_node.items():
        op = op_of.get(name, "?")
        read = weights.get(name, 0) + (kv_per_layer if op in ("GroupQueryAttention", decode_kernels.DECODE_OP) else 0)
        nodes.append({"node": name, "op": op, "ms": ms, "bytes": read})
    return {"engine": engine_dir, "context": context, "steps": steps, "threads": threads, "rows": rows,
            "decode_kernels": kernels,
            "kv_dtype": np.dtype(engine.kv_dtype).name,
            "quantize": rt.engine_dir.manifest["build"]["options"].get("quantize"),
            "step_ms_wall": float(np.median(walls[warmup:]) * 1000),
            "run_ms": float(np.median([r["dur"] for r in profiled]) / 1000), "nodes": nodes}


def table(result: dict, bandwidth: float, top: int) -> str:
    nodes = result["nodes"]
    by_op = defaultdict(lambda: [0.0, 0, 0])
    for x in nodes:
        agg = by_op[x["op"]]
        agg[0] += x["ms"]
        agg[1] += x["bytes"]
        agg[2] += 1
    kernel_ms = sum(x["ms"] for x in nodes)
    total_bytes = sum(x["bytes"] for x in nodes)

    def row(name, ms, nbytes, count=""):
        gbs = nbytes / (ms / 1000) / 1e9 if ms > 0 and nbytes else 0.0
        floor = nbytes / bandwidth / 1e6
        return (f"| {name} | {count} | {ms:.2f} | {100 * ms / kernel_ms:.0f}% | {nbytes / 1e6:.1f} | {floor:.2f} | "
                f"{gbs:.1f} |" if nbytes else f"| {name} | {count} | {ms:.2f} | {100 * ms / kernel_ms:.0f}% | 0 | | |")

    head = ("| op | nodes | ms/step | share | MB read/step | floor ms | GB/s |\n"
            "| --- | --- | --- | --- | --- | --- | --- |")
    lines = [f"engine {result['engine']} (quantize {result['quantize'] or 'none'}, KV {result['kv_dtype']}), "
             f"context {result['context']}, {result['steps']} profiled decode steps of {result['rows']} row(s), "
             f"{result['threads']} threads, decode kernels {result['decode_kernels'] or 'none'}; "
             f"bandwidth {bandwidth:.1f} GB/s", "",
             f"step: {result['step_ms_wall']:.2f} ms wall (median), {result['run_ms']:.2f} ms in session.run, "
             f"{kernel_ms:.2f} ms in kernels; bytes {total_bytes / 1e6:.1f} MB -> floor "
             f"{total_bytes / bandwidth / 1e6:.2f} ms ({result['step_ms_wall'] / (total_bytes / bandwidth / 1e6):.2f}x "
             f"of it)", "", head]
    for op, (ms, nbytes, count) in sorted(by_op.items(), key=lambda kv: -kv[1][0]):
        lines.append(row(op, ms, nbytes, count))
    lines.append(row("**all kernels**", kernel_ms, total_bytes, len(nodes)))
    if top:
        lines += ["", f"slowest {top} nodes:", "", head.replace("| nodes ", "| op ").replace("| op |", "| node |", 1)]
        for x in sorted(nodes, key=lambda x: -x["ms"])[:top]:
            lines.append(row(x["node"], x["ms"], x["bytes"], x["op"]))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine", help="engine dir of the ort graph variant")
    p.add_argument("--context", type=int, default=1024, help="prompt tokens before the profiled decode steps")
    p.add_argument("--steps", type=int, default=16, help="decode steps profiled")
    p.add_argument("--warmup", type=int, default=4, help="decode steps run before profiling starts counting")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (and the copy's threads)")
    p.add_argument("--bandwidth", type=float, help="memory bandwidth in GB/s (default: measured)")
    p.add_argument("--top", type=int, default=8, help="also list the N slowest nodes")
    p.add_argument("--json", help="also write the raw per-node result here")
    p.add_argument("--rows", type=int, default=1, help="rows per decode step (a slot pool, as the scheduler runs)")
    p.add_argument("--decode-kernels", metavar="LIB", help="profile with this cpp/ortops library")
    a = p.parse_args()
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("note: OMP_WAIT_POLICY is not PASSIVE (torch's OpenMP threads may spin)")
    bandwidth = a.bandwidth or read_bandwidth_gbs(a.threads)
    result = profile(a.engine, a.context, a.steps, a.warmup, a.threads, a.rows, a.decode_kernels)
    print(f"load average before/after: {os.getloadavg()[0]:.2f}")
    print(table(result, bandwidth, a.top))
    if a.json:
        Path(a.json).write_text(json.dumps({**result, "bandwidth_gbs": bandwidth}, indent=1))


if __name__ == "__main__":
    main()
