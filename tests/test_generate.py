"""Generator: sampling, stop conditions, streaming, batching with per-request online skipping, context limits."""

from __future__ import annotations

import pytest
import torch

from adaskip.errors import InputError
from adaskip.model import load_model
from adaskip.plan import Calibration, adaskip_plan
from adaskip.policy import SkipPolicy
from adaskip.runtime.generate import Generator, SamplingParams
from adaskip.runtime.torch_engine import TorchEngine


@pytest.fixture(scope="module")
def chat(tiny_chat_model):
    from transformers import AutoTokenizer

    model = load_model(str(tiny_chat_model))
    return model, AutoTokenizer.from_pretrained(str(tiny_chat_model))


def _gen(model, tok, beta_sim=0.3, k=1, window=4, mode="e2e") -> Generator:
    """A plan with a low threshold so that online FFN skipping really fires on a random model."""
    n = model.spec.num_sublayers
    sims = [0.0] * n
    sims[2] = beta_sim  # attention of layer 1 is the offline skip; beta = beta_sim
    calib = Calibration(similarity=sims, norm_ratio=[1.05] * n, num_prompts=1, prompt_tokens=8,
                        data_digest="sha256:t", source="test")
    plan = adaskip_plan(calib, k, mode, model.fingerprint, window=window)
    return Generator(TorchEngine.from_loaded(model), SkipPolicy(plan), tok, eos_token_ids=(2,))


PROMPTS = ["The history of the printing press begins", "Water boils at", "A list of prime numbers: 2, 3, 5,"]


def test_batch_equals_each_request_alone_with_online_skipping(chat):
    model, tok = chat
    gen = _gen(model, tok)
    ids = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=16, stop_token_ids=())
    batch = gen.generate(ids, params)
    solo = [gen.generate([x], params)[0] for x in ids]
    assert any(r.online_skipped for r in solo), "online skipping should fire in this setup"
    for b, s in zip(batch, solo):
        assert b.tokens == s.tokens
        assert b.online_skipped == s.online_skipped
        assert b.prefill_skipped == s.prefill_skipped == [2]


def test_streaming_yields_the_same_tokens_and_text(chat):
    model, tok = chat
    gen = _gen(model, tok)
    ids = [tok.encode(PROMPTS[0])]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=())
    results: list = []
    events = list(gen.stream(ids, params, results))
    whole = gen.generate(ids, params)[0]
    assert [e.token for e in events if e.token is not None] == whole.tokens == results[0].tokens
    assert "".join(e.text for e in events) == whole.text


def test_sampling_is_seeded_and_top_k_1_is_greedy(chat):
    model, tok = chat
    gen = _gen(model, tok)
    ids = [tok.encode(PROMPTS[1])]
    greedy = gen.generate(ids, SamplingParams(max_new_tokens=10, stop_token_ids=()))[0].tokens
    top1 = gen.generate(ids, SamplingParams(max_new_tokens=10, temperature=0.8, top_k=1, seed=3,
                                            stop_token_ids=()))[0].tokens
    assert top1 == greedy
    a = gen.generate(ids, SamplingParams(max_new_tokens=10, temperature=1.5, top_p=0.95, seed=7, stop_token_ids=()))
    b = gen.generate(ids, SamplingParams(max_new_tokens=10, temperature=1.5, top_p=0.95, seed=7, stop_token_ids=()))
    c = gen.generate(ids, SamplingParams(max_new_tokens=10, temperature=1.5, top_p=0.95, seed=8, stop_token_ids=()))
    assert a[0].tokens == b[0].tokens
    assert a[0].tokens != c[0].tokens


def test_stop_token_and_stop_string(chat):
    model, tok = chat
    gen = _gen(model, tok)
    ids = [tok.encode(PROMPTS[2])]
    free = gen.generate(ids, SamplingParams(max_new_tokens=12, stop_token_ids=()))[0]
    stop_at = free.tokens[5]
    first = free.tokens.index(stop_at)
    stopped = gen.generate(ids, SamplingParams(max_new_tokens=12, stop_token_ids=(stop_at,)))[0]
    assert stopped.finish_reason == "stop" and stopped.tokens == free.tokens[:first]
    assert free.finish_reason == "length"
    needle = free.text[len(free.text) // 2:][:3]
    cut = gen.generate(ids, SamplingParams(max_new_tokens=12, stop_token_ids=(), stop_strings=(needle,)))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(needle)]


def test_context_limit_empty_prompt_and_bad_options(chat):
    model, tok = chat
    gen = _gen(model, tok)  # context 2048
    long_ids = [list(range(100, 2100))]
    with pytest.raises(InputError, match="exceeds the model's context of 2048"):
        gen.generate(long_ids, SamplingParams(max_new_tokens=64))
    fits = gen.generate(long_ids, SamplingParams(max_new_tokens=48, stop_token_ids=()))[0]  # 2000 + 48 = 2048
    assert not fits.truncated_prompt and fits.prompt_tokens == 2000 and len(fits.tokens) == 48
    res = gen.generate(long_ids, SamplingParams(max_new_tokens=64, truncate="middle", stop_token_ids=()))[0]
    assert res.truncated_prompt and res.prompt_tokens == 2048 - 64 and len(res.tokens) == 64
    kept = gen._check_prompts(long_ids, SamplingParams(max_new_tokens=64, truncate="middle"))[0][0]
    assert kept == long_ids[0][:992] + long_ids[0][-992:]  # beginning and end kept, middle dropped
    with pytest.raises(InputError, match="empty"):
        gen.encode("   ")
    with pytest.raises(InputError, match="empty"):
        gen.generate([[]], SamplingParams())
    with pytest.raises(InputError, match="vocabulary"):
        gen.generate([[10**6]], SamplingParams())
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2),
                dict(truncate="left"), dict(max_new_tokens=4096)):
        with pytest.raises(InputError):
            gen.generate([[5, 6]], SamplingParams(**bad))


def test_chat_template_is_applied(chat):
    model, tok = chat
    gen = _gen(model, tok)
    ids = gen.encode("hello", chat=True)
    assert tok.decode(ids).startswith("<|im_start|>system") and tok.decode(ids).endswith("assistant\n")


def test_streaming_never_shows_the_start_of_a_stop_string(chat):
    model, tok = chat
    gen = _gen(model, tok)
    ids = [tok.encode(PROMPTS[0])]
    free = gen.generate(ids, SamplingParams(max_new_tokens=12, stop_token_ids=()))[0]
    stop = free.text[len(free.text) // 2:][:4]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(), stop_strings=(stop,))
    shown = ""
    for event in gen.stream(ids, params):
        shown += event.text
        assert stop[:2] not in shown[len(free.text[:free.text.index(stop)]):]
    assert shown == free.text[:free.text.index(stop)]
    # a stop string that never completes: the held-back tail is flushed at the end
    tail = SamplingParams(max_new_tokens=12, stop_token_ids=(), stop_strings=(free.text[-2:] + "\x00never",))
    assert "".join(e.text for e in gen.stream(ids, tail)) == free.text


def test_incremental_detokenization_equals_decoding_everything(smollm2_tokenizer):
    import random

    from adaskip.runtime.generate import _Detokenizer

    def decode(t):
        return smollm2_tokenizer.decode(t, skip_special_tokens=True)

    text = "Héllo wörld — ünïcode 🙂 and 日本語のテキスト。\ndef f(x):\n    return x ** 2  # squared\n" * 3
    random.seed(0)
    for seq in (smollm2_tokenizer.encode(text, add_special_tokens=False),
                [random.randrange(smollm2_tokenizer.vocab_size) for _ in range(200)]):
        detok, compared = _Detokenizer(decode), 0
        for n in range(1, len(seq) + 1):
            out, full = detok.add(seq[:n]), decode(seq[:n])
            if not full.endswith("\ufffd"):  # mid-character the detokenizer waits; afterwards it must agree
                assert out == full
                compared += 1
        assert detok.text == decode(seq) and compared > len(seq) // 2


def test_sampling_draws_each_token_at_its_probability_and_never_a_masked_one(monkeypatch):
    """sample() by inverse CDF: the empirical frequencies match the softmax (20k draws, within 0.015), a token of
    probability 0 (masked by top-k or -inf) is never drawn, and a uniform that rounds up to the total picks the last
    token with any probability."""
    from adaskip.runtime import generate

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2]])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([generate.sample(torch.log(probs), SamplingParams(temperature=1.0), g) for _ in range(20000)])
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    assert freq[1] == 0 and torch.allclose(freq, probs[0].double(), atol=0.015)
    top2 = torch.cat([generate.sample(torch.log(probs), SamplingParams(temperature=1.0, top_k=2), g)
                      for _ in range(2000)])
    assert set(top2.tolist()) == {0, 2}
    monkeypatch.setattr(generate.torch, "rand", lambda shape, **kw: torch.ones(shape, dtype=torch.float64))
    edge = torch.log(torch.tensor([[0.2, 0.8, 0.0, 0.0]]))
    assert generate.sample(edge, SamplingParams(temperature=1.0), None).tolist() == [1]


def test_a_row_sampled_in_a_batch_gets_the_token_it_gets_alone():
    """sample_rows (the serving batch's sampler: greedy rows and plain-temperature rows each in one call) gives
    every row, under its own params and seeded generator, exactly the token sample() gives it alone."""
    from adaskip.runtime import generate

    logits = torch.randn(24, 5000, generator=torch.Generator().manual_seed(1)) * 4
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7),
             SamplingParams(temperature=1.9), SamplingParams(temperature=1.0, top_k=40),
             SamplingParams(temperature=0.8, top_p=0.9)]
    params = [kinds[b % len(kinds)] for b in range(len(logits))]
    for step in range(5):  # the generators advance alike in both ways
        batched = generate.sample_rows(logits, params, [torch.Generator().manual_seed(100 * step + b)
                                                        for b in range(len(logits))])
        alone = [int(generate.sample(logits[b:b + 1], p, torch.Generator().manual_seed(100 * step + b))[0])
                 for b, p in enumerate(params)]
        assert batched == alone
    assert generate.sample_rows(logits[:0], [], []) == []
