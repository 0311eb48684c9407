"""Decode ms/token of several `ort`-variant engine dirs of one model (fp32, int4, int8, float16 KV...), interleaved
(docs/benchmarks.md, "Decode bytes").

All engines are loaded in one process (2 intra-op threads each, spinning off). Each prefills the same random prompt
of max(--contexts) tokens once; then every repeat, for each context, runs --steps greedy decode steps on every engine
in a rotating order, with the cache cut back to that context first (the prompt's first N tokens are a valid N-token
cache: prefill is causal). A cell is the median ms/step of its steps; the table shows the median over repeats and the
ratio to the first engine. Run with OMP_WAIT_POLICY=PASSIVE; it prints the load average before and after.

Usage: python scripts/decode_options_bench.py NAME=ENGINE_DIR ... [--contexts 1024,4096] [--steps 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from adaskip.runtime.loader import load_runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engines", nargs="+", help="NAME=ENGINE_DIR; the first is the baseline of the ratios")
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    names = [e.split("=", 1)[0] for e in a.engines]
    load0 = os.getloadavg()
    runtimes = {e.split("=", 1)[0]: load_runtime(e.split("=", 1)[1], threads=a.threads) for e in a.engines}
    top = max(contexts)
    spec = next(iter(runtimes.values())).engine.spec
    ids = torch.randint(0, spec.vocab_size, (1, top), generator=torch.Generator().manual_seed(0))
    n = spec.num_sublayers
    skip, scales = torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n)
    caches = {}
    for name, rt in runtimes.items():
        cache = rt.engine.new_cache(1, top + a.steps + 1, list(rt.policy.layout.cached_layers))
        rt.engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), cache, skip, scales, want_stats=False)
        caches[name] = cache
    cells: dict[tuple[str, int], list[float]] = {}
    for rep in range(a.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for ctx in contexts:
            for name in order:
                engine, cache = runtimes[name].engine, caches[name]
                cache.lengths[:] = ctx
                token = torch.tensor([int(ids[0, ctx - 1])])
                times = []
                for _ in range(a.steps):
                    t = time.perf_counter()
                    out = engine.decode(token, cache, skip, scales, want_stats=False)
                    times.append(time.perf_counter() - t)
                    token = out.logits.argmax(-1)
                cells.setdefault((name, ctx), []).append(float(np.median(times)) * 1000)
    load1 = os.getloadavg()
    print(f"load average (1/5/15 min) before {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, after "
          f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f}; {a.threads} threads, {a.steps} steps per cell, medians of "
          f"{a.repeats}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print("| engine | " + " | ".join(f"{c} decode ms/token | vs {names[0]}" for c in contexts) + " |")
    print("| --- |" + " --- | --- |" * len(contexts))
    for name in names:
        row = []
        for c in contexts:
            ms = float(np.median(cells[(name, c)]))
            base = float(np.median(cells[(names[0], c)]))
            row += [f"{ms:.1f}", f"{ms / base:.2f}x"]
        print(f"| {name} | " + " | ".join(row) + " |")
    print("raw cells (ms/token per repeat):", {f"{k[0]}@{k[1]}": [round(x, 2) for x in v] for k, v in cells.items()})


if __name__ == "__main__":
    main()
