"""Skipping is real: skipped sublayers read no weights, output scale * input, and skipped attention has no KV."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_hf

from adaskip.model import load_model
from adaskip.plan import Calibration, adaskip_plan
from adaskip.policy import SkipPolicy
from adaskip.runtime.generate import Generator, SamplingParams
from adaskip.runtime.torch_engine import TorchEngine, rms_norm


def _tiny(tiny_root, kind="llama"):
    return load_model(str(make_tiny_hf(kind, tiny_root)))


def _forward(engine, ids, skip_js, scales=None):
    n = engine.spec.num_sublayers
    skip = torch.zeros(1, n, dtype=torch.bool)
    skip[0, skip_js] = True
    sc = torch.ones(1, n) if scales is None else scales
    cache = engine.new_cache(1, ids.shape[1], [i for i in range(engine.spec.num_layers) if 2 * i not in skip_js])
    return engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), cache, skip, sc, all_logits=True), cache


def test_skipped_sublayers_read_no_weights(tiny_root):
    model = _tiny(tiny_root)
    ids = torch.randint(0, 320, (1, 12))
    full_engine = TorchEngine(model.spec, dict(model.weights))
    expected, _ = _forward(full_engine, ids, [2, 5])
    weights = dict(model.weights)
    for role in ("attn_norm", "q", "k", "v", "o"):
        del weights[f"layers.1.{role}"]  # attention of layer 1 (sublayer 2)
    for role in ("ffn_norm", "gate", "up", "down"):
        del weights[f"layers.2.{role}"]  # FFN of layer 2 (sublayer 5)
    out, cache = _forward(TorchEngine(model.spec, weights), ids, [2, 5])  # a read would raise KeyError
    assert torch.equal(out.logits, expected.logits)
    assert cache.k[1] is None and cache.v[1] is None
    assert torch.isnan(out.similarity[0, [2, 5]]).all() and not torch.isnan(out.similarity[0, [0, 1, 3, 4]]).any()


def test_skipped_sublayer_output_is_scale_times_input(tiny_root):
    model = _tiny(tiny_root)
    engine = TorchEngine.from_loaded(model)
    ids = torch.randint(0, 320, (1, 10))
    scales = torch.ones(1, 8)
    scales[0, 1], scales[0, 2] = 0.7, 1.3
    out, _ = _forward(engine, ids, [1, 2], scales)
    # by hand: layer 0 attention runs, its FFN is skipped (x0.7), layer 1 attention skipped (x1.3), rest runs
    w, spec = model.weights, model.spec
    cache = engine.new_cache(1, 10, list(range(spec.num_layers)))
    from adaskip.model.rope import rope_cos_sin

    cos, sin = rope_cos_sin(engine.inv_freq, torch.arange(10)[None])
    mask = engine._mask(torch.ones(1, 10, dtype=torch.bool), 0, 10, None)
    h = torch.nn.functional.embedding(ids, w["embed"])
    h = h + engine._attention(0, h, cos, sin, cache, 0, mask)
    h = 0.7 * h
    h = 1.3 * h
    h = h + engine._ffn(1, h)
    for i in (2, 3):
        h = h + engine._attention(i, h, cos, sin, cache, 0, mask)
        h = h + engine._ffn(i, h)
    logits = torch.nn.functional.linear(rms_norm(h, w["final_norm"], spec.norm_eps), engine.lm_head)
    assert torch.allclose(out.logits, logits, atol=1e-5)


def _plan_for(model, skip_first: list[int], mode="e2e", window=20):
    """An AdaSkip plan whose calibration ranks `skip_first` as most similar."""
    n = model.spec.num_sublayers
    sims = [0.5] * n
    for rank, j in enumerate(skip_first):
        sims[j] = 0.99 - rank * 0.001
    calib = Calibration(similarity=sims, norm_ratio=[1.1] * n, num_prompts=1, prompt_tokens=8,
                        data_digest="sha256:t", source="test")
    return adaskip_plan(calib, len(skip_first), mode, model.fingerprint, window=window)


def test_no_kv_cache_for_skipped_attention_including_layer0(tiny_root):
    model = _tiny(tiny_root)
    plan = _plan_for(model, [0, 4])  # attention of layers 0 and 2
    gen = Generator(TorchEngine.from_loaded(model), SkipPolicy(plan))
    res = gen.generate([[5, 6, 7, 8, 9]], SamplingParams(max_new_tokens=12))[0]
    assert len(res.tokens) == 12
    assert res.kv_bytes == res.kv_bytes_full // 2  # 2 of 4 layers hold K/V
    assert res.prefill_skipped == [0, 4]


def test_decode_mode_prefill_runs_everything_but_caches_only_live_layers(tiny_root):
    model = _tiny(tiny_root)
    plan = _plan_for(model, [2, 3], mode="decode")
    gen = Generator(TorchEngine.from_loaded(model), SkipPolicy(plan))
    res = gen.generate([[5, 6, 7, 8, 9]], SamplingParams(max_new_tokens=6))[0]
    assert res.prefill_skipped == [] and res.decode_skipped_offline == [2, 3]
    assert res.kv_bytes == res.kv_bytes_full * 3 // 4


def test_calibration_averages_per_request_then_over_requests(tiny_root):
    from adaskip.calibrate.importance import calibrate
    from adaskip.calibrate.corpus import CalibrationSet

    model = _tiny(tiny_root)
    engine = TorchEngine.from_loaded(model)
    prompts = [list(range(10, 30)), list(range(50, 62))]  # different lengths: a token-weighted mean would differ
    both = calibrate(engine, CalibrationSet(prompts, "t", "d"), progress=False)
    singles = [calibrate(engine, CalibrationSet([p], "t", "d"), progress=False) for p in prompts]
    for j in range(model.spec.num_sublayers):
        assert abs(both.similarity[j] - (singles[0].similarity[j] + singles[1].similarity[j]) / 2) < 1e-6
        assert abs(both.norm_ratio[j] - (singles[0].norm_ratio[j] + singles[1].norm_ratio[j]) / 2) < 1e-6
    assert both.num_prompts == 2 and both.prompt_tokens == 20


def test_incremental_decode_with_skips_equals_a_full_forward_with_the_same_mask(tiny_root):
    """KV handling of skipped layers: growing the cache token by token gives the full forward's logits."""
    model = _tiny(tiny_root)
    engine = TorchEngine.from_loaded(model)
    n = model.spec.num_sublayers
    skip = torch.zeros(1, n, dtype=torch.bool)
    skip[0, [2, 5]] = True  # attention of layer 1, FFN of layer 2
    scales = torch.full((1, n), 0.9)
    ids = torch.randint(0, 320, (1, 16))
    cached = [0, 2, 3]
    full = engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), engine.new_cache(1, 16, cached), skip, scales,
                          all_logits=True)
    cache = engine.new_cache(1, 16, cached)
    engine.prefill(ids[:, :10], torch.ones(1, 10, dtype=torch.bool), cache, skip, scales)
    for t in range(10, 16):
        step = engine.decode(ids[:, t], cache, skip, scales)
        assert (step.logits[0] - full.logits[0, t]).abs().max() <= 1e-4


def test_online_ffns_really_stop_running_after_the_window(tiny_root):
    """After W decode steps the learned FFNs report no stats (did not run) and the output uses their scale."""
    model = _tiny(tiny_root)
    plan = _plan_for(model, [2], window=3)
    plan.beta = -1.0  # every FFN qualifies: the test is about the mechanics, not the threshold
    policy = SkipPolicy(plan)
    engine = TorchEngine.from_loaded(model)
    seen = []

    class Spy:
        spec, dtype = engine.spec, engine.dtype

        def new_cache(self, *a):
            return engine.new_cache(*a)

        def prefill(self, *a, **k):
            return engine.prefill(*a, **k)

        def decode(self, tokens, cache, skip, scales, want_stats=True):
            out = engine.decode(tokens, cache, skip, scales, want_stats=True)  # always: to see what ran
            assert want_stats == (len(seen) < 3)  # the generator asks for stats only while the window is open
            seen.append((skip[0].tolist(), scales[0].tolist(), out.similarity[0].tolist(), out.norm_ratio[0].tolist()))
            return out

    res = Generator(Spy(), policy).generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=7, stop_token_ids=()))[0]
    assert res.online_skipped == [1, 3, 5, 7]
    window_ratio = {j: sum(seen[t][3][j] for t in range(3)) / 3 for j in (1, 3, 5, 7)}
    for step, (skip, scales, sims, _) in enumerate(seen, 1):
        ffn_skipped = [skip[j] for j in (1, 3, 5, 7)]
        assert all(ffn_skipped) == (step > 3) and any(ffn_skipped) == (step > 3)
        if step > 3:
            assert all(math.isnan(sims[j]) for j in (1, 3, 5, 7))  # they did not run
            for j in (1, 3, 5, 7):  # replaced by the decode-mean norm ratio of the window
                assert scales[j] == pytest.approx(window_ratio[j], rel=1e-5)
