"""The reference engine against Hugging Face transformers, fp32: tiny random models of every family + SmolLM2."""

from __future__ import annotations

import pytest
import torch
from conftest import long_text, make_tiny_hf, tiny_configs

from adaskip.model import load_model
from adaskip.runtime.torch_engine import TorchEngine

TOL = 1e-4


def _run_all(engine: TorchEngine, ids: torch.Tensor, valid: torch.Tensor | None = None):
    n = engine.spec.num_sublayers
    b = ids.shape[0]
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
    cache = engine.new_cache(b, ids.shape[1] + 8, list(range(engine.spec.num_layers)))
    out = engine.prefill(ids, valid, cache, torch.zeros(b, n, dtype=torch.bool), torch.ones(b, n), all_logits=True)
    return out, cache


@pytest.mark.parametrize("kind", sorted(tiny_configs()))
def test_tiny_family_prefill_and_decode_match_transformers(kind, tiny_root):
    from transformers import AutoModelForCausalLM

    path = make_tiny_hf(kind, tiny_root)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = TorchEngine.from_loaded(load_model(str(path)))
    torch.manual_seed(0)
    ids = torch.randint(0, 320, (2, 40))  # 40 > sliding window 8 and > llama3's original 32 positions
    with torch.no_grad():
        ref = hf(ids).logits
    out, cache = _run_all(engine, ids[:, :32])
    assert (out.logits - ref[:, :32]).abs().max().item() <= TOL
    # incremental decode over the KV cache reproduces the full forward
    n = engine.spec.num_sublayers
    for t in range(32, 40):
        step = engine.decode(ids[:, t], cache, torch.zeros(2, n, dtype=torch.bool), torch.ones(2, n))
        assert (step.logits - ref[:, t]).abs().max().item() <= TOL, f"decode position {t}"


def test_spec_captures_family_quirks(tiny_root):
    qwen = load_model(str(make_tiny_hf("qwen2", tiny_root))).spec
    assert qwen.attention_windows == (None, None, 8, 8)
    assert "layers.0.q_bias" in load_model(str(make_tiny_hf("qwen2", tiny_root))).weights
    assert load_model(str(make_tiny_hf("mistral", tiny_root))).spec.attention_windows == (8,) * 4
    assert load_model(str(make_tiny_hf("llama3-rope", tiny_root))).spec.rope_scaling["type"] == "llama3"
    untied = load_model(str(make_tiny_hf("llama-untied-mha", tiny_root)))
    assert "lm_head" in untied.weights and untied.spec.num_kv_heads == 4


def test_left_padded_batch_matches_unpadded_rows(tiny_root):
    engine = TorchEngine.from_loaded(load_model(str(make_tiny_hf("llama", tiny_root))))
    torch.manual_seed(1)
    a, b = torch.randint(0, 320, (1, 20)), torch.randint(0, 320, (1, 13))
    ids = torch.zeros(2, 20, dtype=torch.long)
    valid = torch.zeros(2, 20, dtype=torch.bool)
    ids[0], valid[0] = a[0], True
    ids[1, 7:], valid[1, 7:] = b[0], True
    batched, _ = _run_all(engine, ids, valid)
    solo_a, _ = _run_all(engine, a)
    solo_b, _ = _run_all(engine, b)
    assert (batched.logits[0] - solo_a.logits[0]).abs().max() <= TOL
    assert (batched.logits[1, 7:] - solo_b.logits[0]).abs().max() <= TOL
    assert torch.allclose(batched.similarity[1], solo_b.similarity[0], atol=1e-5)


def test_smollm2_logits_match_transformers_on_long_real_text(smollm2, smollm2_hf, smollm2_tokenizer):
    ids = torch.tensor([smollm2_tokenizer.encode(long_text()[:6000])[:1024]])
    engine = TorchEngine.from_loaded(smollm2)
    out, _ = _run_all(engine, ids)
    with torch.no_grad():
        ref = smollm2_hf(ids).logits
    diff = (out.logits - ref).abs().max().item()
    print(f"SmolLM2 max |logit diff| over {ids.shape[1]} tokens: {diff:.2e}")
    assert diff <= TOL


def test_smollm2_64_greedy_tokens_identical_to_transformers(smollm2, smollm2_hf, smollm2_tokenizer):
    from adaskip.plan import baseline_plan
    from adaskip.policy import SkipPolicy
    from adaskip.runtime.generate import Generator, SamplingParams

    prompt = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain what a hash table is and why lookups are fast."}],
        add_generation_prompt=True, tokenize=False)
    ids = smollm2_tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        ref = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    ref_new = ref[0, len(ids):].tolist()
    nothing = baseline_plan("early-exit", 30, 0, "e2e", smollm2.fingerprint)  # k = 0: skips nothing
    gen = Generator(TorchEngine.from_loaded(smollm2), SkipPolicy(nothing), smollm2_tokenizer, eos_token_ids=())
    res = gen.generate([ids], SamplingParams(max_new_tokens=64))[0]
    assert len(ref_new) == 64
    assert res.tokens == ref_new


def test_gguf_file_and_converted_dir_are_the_same_model(smollm2):
    """Loading the original GGUF directly gives the same weights (same fingerprint) as the cached HF directory."""
    from adaskip.model.builtin import builtin_gguf

    direct = load_model(str(builtin_gguf("smollm2-135m")))
    assert direct.spec.num_layers == 30 and direct.tokenizer_kwargs["gguf_file"].endswith(".gguf")
    assert direct.fingerprint == smollm2.fingerprint


def test_hub_id_resolves_from_the_local_cache_only(tiny_root, tmp_path, monkeypatch):
    import shutil

    from conftest import make_tiny_hf

    src = make_tiny_hf("qwen2", tiny_root)
    repo = tmp_path / "hub" / "models--someorg--tiny-qwen"
    snap = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_model("someorg/tiny-qwen")
    assert model.spec.family == "qwen2" and model.fingerprint == load_model(str(src)).fingerprint


# -- Gemma-3-270M: a second real architecture (sandwich norms, q/k norms, 512-token sliding windows) -------------------

def test_gemma3_logits_match_transformers_across_the_sliding_window(gemma3, gemma3_hf, gemma3_long_prompt):
    """600 real tokens: the local layers' window (512) cuts off the oldest keys for the last 88 positions."""
    ids = torch.tensor([gemma3_long_prompt])
    assert ids.shape[1] == 600 > max(w for w in gemma3.spec.attention_windows if w)
    out, _ = _run_all(TorchEngine.from_loaded(gemma3), ids)
    with torch.no_grad():
        ref = gemma3_hf(ids).logits
    diff = (out.logits - ref).abs()
    print(f"Gemma-3-270M max |logit diff| over 600 tokens: {diff.max().item():.2e} "
          f"(positions >= 512: {diff[:, 512:].max().item():.2e}; |logits| up to {ref.abs().max().item():.1f})")
    assert diff.max().item() <= TOL


def test_gemma3_32_greedy_tokens_identical_to_transformers(gemma3, gemma3_hf, gemma3_tokenizer, gemma3_long_prompt):
    """Greedy decode after the 600-token prompt: every step attends through the sliding window and the KV cache."""
    from adaskip.plan import baseline_plan
    from adaskip.policy import SkipPolicy
    from adaskip.runtime.generate import Generator, SamplingParams

    ids = gemma3_long_prompt
    with torch.no_grad():
        ref = gemma3_hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    ref_new = ref[0, len(ids):].tolist()
    nothing = baseline_plan("early-exit", gemma3.spec.num_layers, 0, "e2e", gemma3.fingerprint)
    gen = Generator(TorchEngine.from_loaded(gemma3), SkipPolicy(nothing), gemma3_tokenizer, eos_token_ids=())
    res = gen.generate([ids], SamplingParams(max_new_tokens=32))[0]
    print("Gemma-3-270M greedy continuation:", repr(gemma3_tokenizer.decode(res.tokens)))
    assert len(ref_new) == 32
    assert res.tokens == ref_new
