"""The in-flight batching scheduler: rows join and leave at every step and still equal their solo runs (online
skipping firing), chunked prefill interleaved with decode steps, cancellation, the admission limit."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_hf

from adaskip.errors import InputError
from adaskip.model import load_model
from adaskip.plan import Calibration, adaskip_plan
from adaskip.runtime.generate import Generator, SamplingParams
from adaskip.runtime.loader import load_runtime
from adaskip.runtime.ort_engines import OrtGqaEngine
from adaskip.runtime.scheduler import QueueFull, Scheduler, SchedulerOptions
from adaskip.runtime.torch_engine import TorchEngine


@pytest.fixture(scope="module")
def tiny(tiny_root, tmp_path_factory, smollm2_dir):
    """The tiny Llama built by adaskip-build (the `ort` variant) under a plan whose online FFN skipping fires (beta
    0.3). Built through the command line, whose flags are the stable interface; the builder wants tokenizer files
    next to the model (SmolLM2's stand in: the tests pass token ids)."""
    from adaskip.cli.build import main as build_main

    root = tmp_path_factory.mktemp("sched-engine")
    hf = root / "model"
    shutil.copytree(make_tiny_hf("llama", tiny_root), hf)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / f, hf / f)
    model = load_model(str(hf))
    n = model.spec.num_sublayers
    sims = [0.0] * n
    sims[2] = 0.3  # attention of layer 1 is the offline skip; beta = 0.3, which random FFNs pass
    calib = Calibration(similarity=sims, norm_ratio=[1.05] * n, num_prompts=1, prompt_tokens=8,
                        data_digest="sha256:t", source="test")
    adaskip_plan(calib, 1, "e2e", model.fingerprint, window=4).save(root / "plan.json")
    assert build_main(["--model", str(hf), "-o", str(root / "engine"), "--plan", str(root / "plan.json"),
                       "--calib-tokens", "64", "--quiet"]) == 0
    rt = load_runtime(root / "engine", threads=2)
    assert isinstance(rt.engine, OrtGqaEngine)
    return model, rt.policy, rt.engine


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


def _drain(sched: Scheduler, limit: int = 500) -> None:
    for _ in range(limit):
        if sched.idle:
            return
        sched.step()
    raise AssertionError(f"the scheduler did not finish within {limit} steps")


def test_rows_joining_and_leaving_equal_their_solo_runs_with_online_skipping(tiny):
    model, policy, engine = tiny
    prompts = _prompts([5, 9, 40, 3, 17, 12, 7])
    lengths = [16, 6, 20, 12, 9, 16, 14]  # rows leave at different steps, newcomers fill the freed slots
    params = [SamplingParams(max_new_tokens=n, stop_token_ids=()) for n in lengths]
    params[4] = SamplingParams(max_new_tokens=9, temperature=0.8, top_k=20, seed=7, stop_token_ids=())
    gen = Generator(engine, policy)
    solo = [gen.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    online = [tuple(r.online_skipped) for r in solo]
    assert any(online) and len(set(online)) > 1, "online skipping should fire, differently per row"

    sched = Scheduler(engine, policy, SchedulerOptions(slots=4, slot_capacity=64, step_tokens=8, max_queue=8))
    handles = [sched.submit(p, sp) for p, sp in zip(prompts[:3], params[:3])]
    for _ in range(3):
        sched.step()
    handles += [sched.submit(p, sp) for p, sp in zip(prompts[3:], params[3:])]  # join a running batch
    _drain(sched)
    for h, s in zip(handles, solo):
        assert h.result.tokens == s.tokens, h.id
        assert h.result.online_skipped == s.online_skipped
        assert h.result.prefill_skipped == s.prefill_skipped == [2]
    records = list(sched.records)
    assert any(r.admitted and r.decoded for r in records), "requests joined while others decoded"
    assert any(r.finished and set(r.decoded) - set(r.finished) for r in records), "rows left a running batch"
    assert any(r.filler_rows for r in records), "a freed slot inside the batch's range was carried along"
    assert any(r.online_skips for r in records)
    assert max(len(r.decoded) for r in records) == 4
    # many slot ranges ran, each with its own binding; their step outputs share one row per slot of the pool
    pool = sched.pool
    assert len(pool.bindings) > 2
    assert all(a.shape[0] == pool.slots for a in pool.outputs.values())
    for _, _, results in pool.bindings.values():
        assert all(np.shares_memory(a, pool.outputs[name]) for name, a in results.items())
    # a step's outputs are the caller's own, in the order of the slots asked for, whatever the range they span
    rows = sched.stepper.new_rows(2)
    skip, scales = sched.stepper._masks(rows, decode=True, any_slot=True)
    pool.lengths[[1, 3]] = 4  # whatever their cache holds: both calls see the same
    first = engine.decode_slots([3, 1], torch.tensor([5, 7]), pool, skip, scales)
    pool.lengths[[1, 3]] = 4
    again = engine.decode_slots([1, 3], torch.tensor([7, 5]), pool, skip, scales)
    assert not any(np.shares_memory(t.numpy(), pool.outputs[name]) for name, t in
                   (("logits", first.logits), ("similarity", first.similarity), ("norm_ratio", first.norm_ratio)))
    assert first.logits.shape[0] == first.similarity.shape[0] == 2  # the rows asked for, not the range (1..3)
    torch.testing.assert_close(first.logits, again.logits.flip(0))


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny):
    model, policy, engine = tiny
    streams = _prompts([6, 8, 5, 7], seed=1)
    long_prompt = _prompts([100], seed=2)[0]
    params = SamplingParams(max_new_tokens=40, stop_token_ids=())
    sched = Scheduler(engine, policy, SchedulerOptions(slots=5, slot_capacity=160, step_tokens=16, max_queue=4))
    running = [sched.submit(p, params) for p in streams]
    for _ in range(3):
        sched.step()
    long = sched.submit(long_prompt, SamplingParams(max_new_tokens=5, stop_token_ids=()))
    _drain(sched)
    ids = {h.id for h in running}
    chunks = [(r, c) for r in sched.records for c in r.prefilled if c[0] == long.id]
    assert len(chunks) >= 8  # 100 tokens, 12 per step beside the 4 decoding rows
    assert [c[1] for _, c in chunks] == [0] + [c[2] for _, c in chunks[:-1]] and chunks[-1][1][2] == 100
    for record, (_, first, stop) in chunks:  # every step that took a chunk decoded all 4 streams too
        assert ids <= set(record.decoded) and stop - first <= 16 - len(record.decoded)
    steps = [r.index for r, _ in chunks]
    assert steps == list(range(steps[0], steps[0] + len(steps))), "one chunk per step, decode steps in each"
    gen = Generator(engine, policy)
    assert long.result.tokens == gen.generate([long_prompt], SamplingParams(max_new_tokens=5,
                                                                            stop_token_ids=()))[0].tokens
    for h, p in zip(running, streams):
        assert h.result.tokens == gen.generate([p], params)[0].tokens


def test_cancelled_request_frees_its_slot_at_the_next_step(tiny):
    model, policy, engine = tiny
    events = []
    sched = Scheduler(engine, policy, SchedulerOptions(slots=1, slot_capacity=64, step_tokens=8, max_queue=4))
    params = SamplingParams(max_new_tokens=50, stop_token_ids=())
    a = sched.submit(_prompts([5])[0], params, listener=lambda h, e: events.append((h.id, e)))
    b = sched.submit(_prompts([6])[0], SamplingParams(max_new_tokens=3, stop_token_ids=()))
    queued = sched.submit(_prompts([4])[0], params)
    for _ in range(4):
        sched.step()
    assert sched.running == 1 and not b.done
    a.cancel()
    queued.cancel()
    record = sched.step()
    assert set(record.cancelled) == {a.id, queued.id} and record.admitted == (b.id,)
    assert a.done and a.result.finish_reason == "cancelled" and 0 < len(a.result.tokens) < 50
    assert queued.result.finish_reason == "cancelled" and queued.result.tokens == []
    assert events[-1] == (a.id, None)  # the listener hears the end
    _drain(sched)
    assert b.result.finish_reason == "length" and len(b.result.tokens) == 3
    assert not any(queued.id in r.admitted for r in sched.records)


def test_a_full_queue_is_refused_and_bad_requests_get_clear_errors(tiny):
    model, policy, engine = tiny
    sched = Scheduler(engine, policy, SchedulerOptions(slots=1, slot_capacity=32, step_tokens=8, max_queue=1))
    params = SamplingParams(max_new_tokens=4, stop_token_ids=())
    sched.submit([5, 6], params)
    with pytest.raises(QueueFull, match="queue is full"):
        sched.submit([5, 6], params)
    sched.step()  # admitted: the queue has room again
    sched.submit([7, 8], params)
    with pytest.raises(InputError, match="exceeds a KV slot of 32"):
        sched.submit(list(range(3, 33)), params)
    with pytest.raises(InputError, match="outside the vocabulary"):
        sched.submit([5, 999], params)
    with pytest.raises(InputError, match="empty"):
        sched.submit([], params)
    with pytest.raises(InputError, match="max_new_tokens"):
        sched.submit([5], SamplingParams(max_new_tokens=0))
    _drain(sched)
    for bad, match in ((dict(slots=4, step_tokens=4), "step_tokens"), (dict(slot_capacity=10 ** 6), "context"),
                       (dict(slots=0), "slots"), (dict(max_queue=-1), "max_queue")):
        with pytest.raises(InputError, match=match):
            Scheduler(engine, policy, SchedulerOptions(**{"slot_capacity": 64, **bad}))
    with pytest.raises(InputError, match="ort"):
        Scheduler(TorchEngine.from_loaded(model), policy, SchedulerOptions(slot_capacity=64))


def test_background_loop_streams_concurrent_clients(tiny):
    model, policy, engine = tiny
    prompts = _prompts([4, 9, 13, 6, 21, 5, 8, 11], seed=3)
    params = SamplingParams(max_new_tokens=10, stop_token_ids=())
    solo = [r.tokens for r in (Generator(engine, policy).generate([p], params)[0] for p in prompts)]
    streamed: dict[int, list[int]] = {}
    lock = threading.Lock()

    def listen(handle, event):
        with lock:
            if event is not None:
                streamed.setdefault(handle.id, []).append(event.token)

    results: dict[int, list[int]] = {}
    with Scheduler(engine, policy, SchedulerOptions(slots=3, slot_capacity=48, step_tokens=12,
                                                    max_queue=16)) as sched:
        def client(k):
            h = sched.submit(prompts[k], params, listener=listen)
            results[k] = (h, h.wait(timeout=120).tokens)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
    for k, (h, tokens) in results.items():
        assert tokens == solo[k] == streamed[h.id]
    assert len(results) == len(prompts)


def test_wave_bench_times_a_wave_of_requests_from_their_token_times(tiny):
    """scripts/scheduler_wave_bench.py's wave: C requests submitted together to a Scheduler at temperature 1.0, each
    generating its tokens with no stop; TTFT, aiperf's per-request ITL, the token gap and tokens/s from the
    listener's token times."""
    import importlib.util
    import math
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("scheduler_wave_bench", Path(__file__).parents[1] / "scripts" /
                                                  "scheduler_wave_bench.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, policy, engine = tiny
    rt = SimpleNamespace(engine=engine, policy=policy, tokenizer=None, generator=SimpleNamespace(eos_token_ids=()))
    result = script.wave(rt, SchedulerOptions(slots=4, slot_capacity=64, step_tokens=16), _prompts([12, 9, 20]), 5)
    assert set(result) == {"ttft_ms", "itl_ms", "gap_ms", "outside_ms", "tokens_per_s"}
    assert all(math.isfinite(v) and v > 0 for v in result.values())
    assert result["ttft_ms"] > result["gap_ms"] / 10  # a prompt's prefill precedes its first token
    # the steps that decode all three requests happen (after the prompts are in), and part of each is the forward
    assert result["outside_ms"] < result["gap_ms"]
    assert "run_with_iobinding" not in vars(engine.session)  # the timing wrapper is gone after the wave
