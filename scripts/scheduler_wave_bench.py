"""Serving waves in-process: aiperf's chat cell without HTTP or a load generator, several engine dirs interleaved
(docs/serving.md).

aiperf's cells (scripts/serving_bench.py) run one server after another, so on a shared host the noise of the minutes
between them lands in the comparison. Here every engine is loaded in one process and each repeat runs one wave per
engine and concurrency in a rotating order: a Scheduler with the server's pool (--slots, --step-tokens) gets C
requests at once (aiperf's first wave at concurrency C), each a random prompt of --prompt-tokens ids with
--output-tokens to generate at temperature 1.0 (aiperf's requests name none: OpenAI's default), no stop tokens (its
`ignore_eos`). Token times come from the request's listener on the scheduler thread, so they exclude HTTP. Per wave:
TTFT p50, ITL p50 over requests (aiperf's: (last token time - first token time) / (tokens - 1)), token gap p50
(every gap between two tokens of a request), the p50 time a step that decodes every request (and prefills nothing)
spends outside ONNX Runtime's run (the scheduler's Python: masks, sampling, stop checks, listeners), output
tokens/s; the table shows medians over repeats.

Usage: python scripts/scheduler_wave_bench.py NAME=ENGINE_DIR ... [--decode-kernels NAME=LIB ...]
       [--concurrency 1,16] [--repeats 3] [--prompt-tokens 512] [--output-tokens 256]
Run with OMP_WAIT_POLICY=PASSIVE.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from adaskip.runtime import decode_kernels
from adaskip.runtime.generate import SamplingParams
from adaskip.runtime.loader import load_runtime
from adaskip.runtime.scheduler import Scheduler, SchedulerOptions


def wave(rt, options: SchedulerOptions, prompts: list[list[int]], output_tokens: int) -> dict[str, float]:
    """One wave of len(prompts) requests submitted together; latency statistics from each request's token times."""
    scheduler = Scheduler(rt.engine, rt.policy, options, rt.tokenizer, rt.generator.eos_token_ids)
    times: dict[int, list[float]] = {}

    def listener(handle, event) -> None:
        if event is not None and event.token is not None:
            times.setdefault(handle.id, []).append(time.perf_counter())

    params = SamplingParams(max_new_tokens=output_tokens, temperature=1.0, stop_token_ids=())
    session = rt.engine.session
    forward = [0.0]  # seconds in ONNX Runtime's run during the current step

    def timed_run(*args, **kwargs):
        t = time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            forward[0] += time.perf_counter() - t

    run, session.run_with_iobinding = session.run_with_iobinding, timed_run
    outside = []  # per step that decodes every request and prefills nothing: its time outside the forward
    start = time.perf_counter()
    try:
        handles = [scheduler.submit(p, params, listener) for p in prompts]
        while not scheduler.idle:
            forward[0] = 0.0
            record = scheduler.step()
            if record is not None and not record.prefilled and len(record.decoded) == len(prompts):
                outside.append(record.seconds - forward[0])
    finally:
        del session.run_with_iobinding  # the instance attribute goes; the binding's own method is back
    wall = time.perf_counter() - start
    assert all(h.done and h.error is None for h in handles)
    stamps = [times[h.id] for h in handles]
    gaps = np.concatenate([np.diff(s) for s in stamps])
    return {"ttft_ms": 1e3 * float(np.median([s[0] - start for s in stamps])),
            "itl_ms": 1e3 * float(np.median([(s[-1] - s[0]) / (len(s) - 1) for s in stamps])),
            "gap_ms": 1e3 * float(np.median(gaps)),
            "outside_ms": 1e3 * float(np.median(outside)) if outside else float("nan"),
            "tokens_per_s": sum(len(s) for s in stamps) / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engines", nargs="+", help="NAME=ENGINE_DIR")
    p.add_argument("--decode-kernels", action="append", default=[], metavar="NAME=LIB",
                   help="open engine NAME with cpp/ortops's decode kernels (the others without)")
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--step-tokens", type=int, default=SchedulerOptions.step_tokens)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    kernels = dict(item.split("=", 1) for item in a.decode_kernels)
    runtimes = {}
    for item in a.engines:
        name, path = item.split("=", 1)
        os.environ[decode_kernels.ENV] = kernels.get(name, "")  # read when the engine loads
        runtimes[name] = load_runtime(path, threads=a.threads)
    levels = [int(c) for c in a.concurrency.split(",")]
    vocab = next(iter(runtimes.values())).engine.spec.vocab_size
    rng = np.random.default_rng(a.seed)
    prompts = [rng.integers(100, vocab, a.prompt_tokens).tolist() for _ in range(max(levels))]
    options = SchedulerOptions(slots=a.slots, step_tokens=a.step_tokens)
    load_before = os.getloadavg()
    cells: dict[tuple[str, int], list[dict[str, float]]] = {}
    names = list(runtimes)
    for rep in range(a.repeats):
        for i in range(len(names)):
            name = names[(i + rep) % len(names)]
            for c in levels:
                result = wave(runtimes[name], options, prompts[:c], a.output_tokens)
                cells.setdefault((name, c), []).append(result)
                print(f"repeat {rep} {name} c={c}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()),
                      flush=True)
    print(f"load average before {'/'.join(f'{x:.1f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}; {a.threads} threads, {a.slots} slots, step tokens "
          f"{a.step_tokens}, {a.prompt_tokens} prompt / {a.output_tokens} output tokens, medians of {a.repeats}")
    print("| engine | concurrency | TTFT p50 (ms) | ITL p50 (ms) | token gap p50 (ms) | step outside the forward p50 "
          "(ms) | output tok/s | ITL / c=1's |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        base = statistics.median(r["itl_ms"] for r in cells.get((name, 1), [{"itl_ms": float("nan")}]))
        for c in levels:
            med = {k: statistics.median(r[k] for r in cells[(name, c)]) for k in cells[(name, c)][0]}
            print(f"| {name} | {c} | {med['ttft_ms']:.0f} | {med['itl_ms']:.1f} | {med['gap_ms']:.1f} | "
                  f"{med['outside_ms']:.1f} | {med['tokens_per_s']:.1f} | {med['itl_ms'] / base:.2f}x |")
    print("raw ITL p50 per repeat (ms):", {f"{n}@c{c}": [round(r["itl_ms"], 1) for r in v]
                                           for (n, c), v in cells.items()})


if __name__ == "__main__":
    main()
