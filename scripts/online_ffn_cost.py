"""Cost of per-row online FFN disagreement in one batched decode step (docs/serving.md): decode_slots with forced
masks over 512-token rows, configurations interleaved, min over repeats (the uncontended cost on a shared host).

Usage: python scripts/online_ffn_cost.py ENGINE_DIR (an `ort`-variant engine, e.g. SmolLM2 K=8 e2e)."""
import sys
import time

import torch

from adaskip.runtime.loader import load_runtime
rt = load_runtime(sys.argv[1], threads=2)  # an engine dir of the `ort` variant, e.g. SmolLM2 K=8 e2e
eng, pol = rt.engine, rt.policy
ffns = [j for j in sorted(pol.layout.online_ffns)]
print("online-eligible FFNs:", len(ffns), "of", eng.spec.num_layers)
CTX = 512
pool = eng.new_cache(16, CTX + 8, list(pol.layout.cached_layers))
base = pol.decode_mask(pol.new_request())
def case(B, skipping, k):
    f = ffns[:k]
    skip = torch.tensor([base.skip] * B); scales = torch.tensor([base.scales] * B, dtype=torch.float32)
    for b in skipping:
        skip[b, f] = True
    return skip, scales
def run(slots, skip, scales):
    toks = torch.randint(0, 1000, (len(slots),))
    pool.lengths[:] = CTX
    t = time.perf_counter(); eng.decode_slots(slots, toks, pool, skip, scales, want_stats=False)
    return (time.perf_counter() - t) * 1000
for k in (4, 8):
    for B in (4, 16):
        cfgs = {
            "none skip": [(list(range(B)), *case(B, [], k))],
            "all skip": [(list(range(B)), *case(B, range(B), k))],
            "half skip": [(list(range(B)), *case(B, range(B // 2), k))],
            "all but one": [(list(range(B)), *case(B, range(1, B), k))],
            "split 2 fwd": [(list(range(B // 2)), *case(B // 2, range(B // 2), k)),
                            (list(range(B // 2, B)), *case(B // 2, [], k))],
        }
        best = {n: float("inf") for n in cfgs}
        for _ in range(12):
            for n, parts in cfgs.items():
                best[n] = min(best[n], sum(run(*p) for p in parts))
        print(f"k={k} online FFNs, B={B}: " + " | ".join(f"{n} {v:.1f} ms" for n, v in best.items()), flush=True)
