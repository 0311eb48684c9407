"""Decode ms/token of several `ort`-variant engine dirs of one model (fp32, int4, int8, float16 KV...), interleaved
(docs/benchmarks.md, "Decode bytes").

All engines are loaded in one process (2 intra-op threads each, spinning off). Each prefills the same random prompt
of max(--contexts) tokens once; then every repeat, for each context, runs --steps greedy decode steps on every engine
in a rotating order, with the cache cut back to that context first (the prompt's first N tokens are a valid N-token
cache: prefill is causal). A cell is the median ms/step of its steps; the table shows the median over repeats and the
ratio to the first engine. Run with OMP_WAIT_POLICY=PASSIVE; it prints the load average before and after.

--rows N times a serving step instead: one decode step of N rows over a pool of N KV slots (the scheduler's
`decode_slots`), every row holding the same prompt. --decode-kernels LIB adds, for every engine, a column NAME+dk: the same engine dir with cpp/ortops's decode kernels
(adaskip/runtime/decode_kernels.py); the greedy tokens of both are compared.

Usage: python scripts/decode_options_bench.py NAME=ENGINE_DIR ... [--contexts 1024,4096] [--steps 32] [--repeats 3]
       [--rows 16] [--decode-kernels build/lib/libadaskip_ortops.so]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from adaskip.runtime import decode_kernels
from adaskip.runtime.loader import load_runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engines", nargs="+", help="NAME=ENGINE_DIR; the first is the baseline of the ratios")
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=1, help="rows per decode step (a slot pool, as the scheduler runs)")
    p.add_argument("--decode-kernels", metavar="LIB", help="also time every engine with this cpp/ortops library")
    a = p.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    columns = [(e.split("=", 1)[0], e.split("=", 1)[1], "") for e in a.engines]
    if a.decode_kernels:
        columns += [(f"{name}+dk", path, a.decode_kernels) for name, path, _ in columns]
    names = [name for name, _, _ in columns]
    load0 = os.getloadavg()
    runtimes = {}
    for name, path, library in columns:  # the engine reads its decode kernels from the environment when it opens
        os.environ[decode_kernels.ENV] = library
        runtimes[name] = load_runtime(path, threads=a.threads)
    top = max(contexts)
    spec = next(iter(runtimes.values())).engine.spec
    ids = torch.randint(0, spec.vocab_size, (1, top), generator=torch.Generator().manual_seed(0))
    n = spec.num_sublayers
    skip, scales = torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n)
    caches = {}
    for name, rt in runtimes.items():
        cache = rt.engine.new_cache(a.rows, top + a.steps + 1, list(rt.policy.layout.cached_layers))
        if a.rows == 1:
            rt.engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), cache, skip, scales, want_stats=False)
        else:  # one prefill, copied into every slot
            rt.engine.prefill_slot(0, ids[0], cache, skip, scales)
            for buf in (*cache.k.values(), *cache.v.values()):
                buf[1:] = buf[:1]
        caches[name] = cache
    cells: dict[tuple[str, int], list[float]] = {}
    tokens: dict[tuple[str, int], list[int]] = {}
    for rep in range(a.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for ctx in contexts:
            for name in order:
                engine, cache = runtimes[name].engine, caches[name]
                cache.lengths[:] = ctx
                token = torch.full((a.rows,), int(ids[0, ctx - 1]))
                times, made = [], []
                for _ in range(a.steps):
                    t = time.perf_counter()
                    if a.rows == 1:
                        out = engine.decode(token, cache, skip, scales, want_stats=False)
                    else:
                        out = engine.decode_slots(list(range(a.rows)), token, cache, skip.expand(a.rows, -1),
                                                  scales.expand(a.rows, -1), want_stats=False)
                    times.append(time.perf_counter() - t)
                    token = out.logits.argmax(-1)
                    made.append(int(token[0]))
                tokens[(name, ctx)] = made
                cells.setdefault((name, ctx), []).append(float(np.median(times)) * 1000)
    load1 = os.getloadavg()
    print(f"load average (1/5/15 min) before {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, after "
          f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f}; {a.threads} threads, {a.steps} steps per cell, medians of "
          f"{a.repeats}, {a.rows} row(s) per step, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    unit = "ms/token" if a.rows == 1 else f"ms/step of {a.rows} rows"
    print("| engine | " + " | ".join(f"{c} decode {unit} | vs {names[0]}" for c in contexts) + " |")
    print("| --- |" + " --- | --- |" * len(contexts))
    for name in names:
        row = []
        for c in contexts:
            ms = float(np.median(cells[(name, c)]))
            base = float(np.median(cells[(names[0], c)]))
            row += [f"{ms:.1f}", f"{ms / base:.2f}x"]
        print(f"| {name} | " + " | ".join(row) + " |")
    for name in names:
        if name.endswith("+dk"):
            base = name[:-3]
            same = [c for c in contexts if tokens[(name, c)] == tokens[(base, c)]]
            print(f"{name}: greedy tokens identical to {base} at {len(same)} of {len(contexts)} contexts "
                  f"({', '.join(map(str, same)) or 'none'})")
    print(f"raw cells ({unit} per repeat):", {f"{k[0]}@{k[1]}": [round(x, 2) for x in v] for k, v in cells.items()})


if __name__ == "__main__":
    main()
