"""What a decode step reads, made smaller: int4 / int8 weights with the LM head quantized too, and a float16 or int8
KV cache, each compared with the reference torch engine (agreement reported, asserted loosely: they are not fp32)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY, make_tiny_hf

from adaskip.builder.options import EngineOptions
from adaskip.calibrate.kv_scales import INT8_MAX, fit_kv_scales, rotation_invariant_absmax
from adaskip.errors import InputError
from adaskip.eval.verify import compare_engines
from adaskip.export.onnx.graph import build_onnx
from adaskip.export.onnx.quantize import HEAD_WEIGHT, all_nodes, quantize
from adaskip.export.onnx.save import save_onnx
from adaskip.model import load_model
from adaskip.plan import baseline_plan
from adaskip.policy import SkipPolicy
from adaskip.runtime.generate import dtype_bytes
from adaskip.runtime.ort_engines import OrtGqaEngine
from adaskip.runtime.torch_engine import TorchEngine

TOL = 1e-4  # fp32 parity, as tests/test_ort.py


def _no_skip(model) -> SkipPolicy:
    return SkipPolicy(baseline_plan("early-exit", model.spec.num_layers, 0, "e2e", model.fingerprint))


def _export(model, out: Path, kv_dtype: str = "float32", kv_scales=None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_onnx(build_onnx(model.spec, model.weights, _no_skip(model).layout, variant="ort", kv_dtype=kv_dtype,
                         kv_scales=kv_scales), out)
    return out


def _compare(model, out: Path, atol: float | None):
    engine = OrtGqaEngine(out / "model.onnx", model.spec, threads=2)
    torch.manual_seed(0)
    prompts = torch.randint(0, model.spec.vocab_size, (2, 16)).tolist()
    return engine, compare_engines(TorchEngine.from_loaded(model), engine, _no_skip(model), prompts, 8, atol=atol)



@pytest.mark.parametrize("kind", ["qwen2", "llama"])  # tied embedding / own LM head
def test_int4_and_int8_quantize_every_linear_layer_and_the_lm_head(kind, tiny_root, tmp_path):
    model = load_model(str(make_tiny_hf(kind, tiny_root)))
    tied = "lm_head" not in model.weights
    assert tied == (kind == "qwen2")
    fp32 = _export(model, tmp_path / "fp32")
    reports = {}
    for bits in ("int4", "int8"):
        out = tmp_path / bits
        shutil.copytree(fp32, out)
        info = quantize(out, bits)
        assert info["quantize"] == bits and info["bits"] == int(bits[3:])
        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        nbits = [n for n in all_nodes(graph) if n.op_type == "MatMulNBits"]
        assert len(nbits) == info["quantized_matmuls"] == 4 * 5 + 1  # (qkv, o, gate, up, down) x 4 layers + head
        assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {int(bits[3:])}
        head = next(n for n in graph.node if "logits" in n.output)
        assert head.op_type == "MatMulNBits"
        # a tied model keeps its fp32 table for the embedding Gather (one row per token) and no Transpose of it
        assert any(n.op_type == "Gather" and n.input[0] == "embed" for n in graph.node)
        assert not any(n.op_type == "Transpose" and n.input[0] == "embed" for n in graph.node)
        assert (HEAD_WEIGHT in info["lm_head"] or "own copy" in info["lm_head"]) == tied
        _, reports[bits] = _compare(model, out, atol=None)
    # reported, not asserted to 1e-4; int8 is much closer to the reference than int4, and both still decode sense
    # (int4 on random tiny weights agrees poorly; the real model's agreement is in docs/benchmarks.md)
    assert 0 < 2 * reports["int8"].max_logit_diff < reports["int4"].max_logit_diff
    assert reports["int8"].token_agreement >= 0.9


def test_quantize_refuses_an_unknown_kind(tiny_root, tmp_path):
    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize(_export(model, tmp_path), "int3")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: sliding-window layers (local_window_size) too
def test_float16_kv_cache_matches_the_reference(kind, tiny_root, tmp_path):
    """GroupQueryAttention keeps K/V in float16 buffers (queries and attention math in float32): greedy tokens equal
    the reference's and logits within float16 rounding; the float32 graph's parity is unchanged."""
    model = load_model(str(make_tiny_hf(kind, tiny_root)))
    out = _export(model, tmp_path / "kv16", kv_dtype="float16")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    kv = [i for i in graph.input if i.name.startswith("past_")]
    kv += [o for o in graph.output if o.name.startswith("present_")]
    assert kv and {i.type.tensor_type.elem_type for i in kv} == {onnx.TensorProto.FLOAT16}
    engine, report = _compare(model, out, atol=2e-2)
    assert engine.kv_dtype == np.float16 and dtype_bytes(engine) == 2  # what the Generator charges per KV element
    cache = engine.new_cache(1, 8, engine.kv_layers)
    assert all(a.dtype == np.float16 for a in list(cache.k.values()) + list(cache.v.values()))
    assert report.passed and report.token_agreement == 1.0 and 0 < report.max_logit_diff <= 2e-2
    engine32, report32 = _compare(model, _export(model, tmp_path / "fp32"), atol=TOL)
    assert engine32.kv_dtype == np.float32 and report32.passed and report32.max_logit_diff <= TOL
    assert report32.token_agreement == 1.0


def test_float16_kv_cache_serves_slots(tiny_root, tmp_path):
    """The scheduler's path (prefill_slot / decode_slots over a pool, buffers bound once) on a float16 cache gives
    the tokens of a float32 cache."""
    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    n = model.spec.num_sublayers
    skip, scales = torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n)
    tokens = {}
    for dtype in ("float32", "float16"):
        engine = OrtGqaEngine(_export(model, tmp_path / dtype, dtype) / "model.onnx", model.spec, threads=2)
        pool = engine.new_cache(3, 32, engine.kv_layers)
        out = engine.prefill_slot(1, torch.arange(5, 17), pool, skip, scales)
        seq = [int(out.logits.argmax(-1))]
        for _ in range(6):
            out = engine.decode_slots([1], torch.tensor(seq[-1:]), pool, skip, scales, want_stats=False)
            seq.append(int(out.logits.argmax(-1)))
        tokens[dtype] = seq
        assert pool.k[0].dtype == np.dtype(dtype) and int(pool.lengths[1]) == 12 + 6
    assert tokens["float16"] == tokens["float32"]


def test_kv_scales_cover_a_key_at_every_rotation():
    """A K channel's scale is its rotary pair's largest length: the key rotated to any position still fits."""
    k = torch.tensor([[3.0, 1.0, 4.0, 0.0], [0.0, -2.0, 0.0, 0.5]])  # [T=2, D=4]: pairs (0, 2) and (1, 3)
    assert rotation_invariant_absmax(k).tolist() == [5.0, pytest.approx(2.0616, abs=1e-4)] * 2
    torch.manual_seed(0)
    k = torch.randn(3, 50, 16) * torch.linspace(0.1, 8, 16)  # [heads, T, D], channels of different sizes
    bound = rotation_invariant_absmax(k)  # [heads, D]
    reached = torch.zeros_like(bound)
    for angle in torch.linspace(0, 6.283, 73):  # every position rotates each pair by some angle (5 degree steps)
        c, s_ = torch.cos(angle), torch.sin(angle)
        rotated = torch.cat([k[..., :8] * c - k[..., 8:] * s_, k[..., 8:] * c + k[..., :8] * s_], dim=-1)
        assert (rotated.abs().amax(dim=1) <= bound + 1e-5).all()
        reached = torch.maximum(reached, rotated.abs().amax(dim=1))
    assert (reached >= bound * 0.996).all()  # and no larger than it must be: some rotation comes within cos(2.5 deg)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])  # sliding windows; gemma3: per-head q/k norms too
def test_int8_kv_cache_stores_what_the_scales_say_and_matches_the_reference(kind, tiny_root, tmp_path):
    """GroupQueryAttention keeps K/V as int8 with the fitted per-channel scales: layer 0's stored values are the
    reference's K (after rotary) and V rounded by those scales, nothing on the fitting prompt saturates, and the
    logits stay close to the reference (closer than int4 weights); the Generator charges 1 byte per element."""
    model = load_model(str(make_tiny_hf(kind, tiny_root)))
    reference = TorchEngine.from_loaded(model)
    torch.manual_seed(0)
    prompts = torch.randint(0, model.spec.vocab_size, (2, 16)).tolist()
    scales = fit_kv_scales(reference, prompts)
    heads, dim = model.spec.num_kv_heads, model.spec.head_dim
    assert set(scales) == set(range(model.spec.num_layers))
    assert all(s.shape == (heads, 1, dim) and s.dtype == np.float32 and (s > 0).all()
               for kv in scales.values() for s in kv)
    out = _export(model, tmp_path / "kv8", kv_dtype="int8", kv_scales=scales)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    kv = [i for i in graph.input if i.name.startswith("past_")]
    kv += [o for o in graph.output if o.name.startswith("present_")]
    assert kv and {i.type.tensor_type.elem_type for i in kv} == {onnx.TensorProto.INT8}
    gqa = [n for n in all_nodes(graph) if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == model.spec.num_layers
    assert all({a.name: a for a in n.attribute}["k_quant_type"].s == b"PER_CHANNEL" for n in gqa)

    engine = OrtGqaEngine(out / "model.onnx", model.spec, threads=2)
    assert engine.kv_dtype == np.int8 and dtype_bytes(engine) == 1
    n = model.spec.num_sublayers
    ids = torch.tensor(prompts[:1])
    ones, no_skip, unit = torch.ones_like(ids, dtype=torch.bool), torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n)
    ref_cache = reference.new_cache(1, 16, list(range(model.spec.num_layers)))
    reference.prefill(ids, ones, ref_cache, no_skip, unit, want_stats=False)
    cache = engine.new_cache(1, 16, engine.kv_layers)
    engine.prefill(ids, ones, cache, no_skip, unit, want_stats=False)
    assert cache.k[0].dtype == np.int8
    for i in range(model.spec.num_layers):
        for stored, ref, scale in ((cache.k[i], ref_cache.k[i], scales[i][0]),
                                   (cache.v[i], ref_cache.v[i], scales[i][1])):
            exact = ref[0].numpy() / scale  # [heads, T, D] in units of the scale
            assert np.abs(exact).max() <= INT8_MAX + 1e-3  # fitted on this prompt: nothing saturates
            # layer 0 sees the reference's own input: its stored values are the rounding; deeper layers see inputs
            # that carry the quantization of the layers below (on these random weights ~0.5-1.2 steps on average)
            error = np.abs(stored[0].astype(np.float32) - exact)
            assert error.max() <= 0.5 + 1e-3 if i == 0 else error.mean() <= 1.5
    _, report = _compare(model, out, atol=None)
    out4 = tmp_path / "int4"
    shutil.copytree(_export(model, tmp_path / "fp32"), out4)
    quantize(out4, "int4")
    _, report4 = _compare(model, out4, atol=None)
    assert 0 < report.max_logit_diff < report4.max_logit_diff / 2 and report.token_agreement >= 0.8


def test_int8_kv_cache_serves_slots_like_its_solo_run(tiny_root, tmp_path):
    """The scheduler's path (chunked prefill_slot / decode_slots over a pool, buffers bound once) on an int8 cache
    gives the tokens of the same engine's plain prefill and decode."""
    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    scales = fit_kv_scales(TorchEngine.from_loaded(model), [list(range(3, 40))])
    engine = OrtGqaEngine(_export(model, tmp_path / "kv8", "int8", scales) / "model.onnx", model.spec, threads=2)
    n = model.spec.num_sublayers
    skip, unit = torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n)
    prompt = torch.arange(5, 17)
    solo = engine.new_cache(1, 32, engine.kv_layers)
    out = engine.prefill(prompt[None], torch.ones(1, 12, dtype=torch.bool), solo, skip, unit, want_stats=False)
    expected = [int(out.logits.argmax(-1))]
    for _ in range(6):
        out = engine.decode(torch.tensor(expected[-1:]), solo, skip, unit, want_stats=False)
        expected.append(int(out.logits.argmax(-1)))
    pool = engine.new_cache(3, 32, engine.kv_layers)
    engine.prefill_slot(0, torch.arange(40, 60), pool, skip, unit)  # a neighbour in the pool
    engine.prefill_slot(1, prompt[:5], pool, skip, unit)  # in two chunks: the second attends to an int8 past
    out = engine.prefill_slot(1, prompt[5:], pool, skip, unit)
    seq = [int(out.logits.argmax(-1))]
    for _ in range(6):
        out = engine.decode_slots([1, 0], torch.tensor([seq[-1], 7]), pool, skip.expand(2, -1), unit.expand(2, -1),
                                  want_stats=False)
        seq.append(int(out.logits[0].argmax(-1)))
    assert pool.k[0].dtype == np.int8 and seq == expected


def test_kv_scales_cover_what_the_plan_runs(tiny_root):
    """Skipping sublayers changes what later layers cache: the scales are the maxima over every skip set given, so
    a prefill under the plan's set does not saturate, and they are not the unskipped model's alone."""
    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    engine = TorchEngine.from_loaded(model)
    prompts = [list(range(3, 40)), list(range(60, 90))]
    skipped = frozenset({1, 2})  # layer 0's FFN and layer 1's attention (which then keeps no cache)
    alone = fit_kv_scales(engine, prompts)
    both = fit_kv_scales(engine, prompts, [frozenset(), skipped, frozenset()])  # repeated sets count once
    n, layers = model.spec.num_sublayers, list(range(model.spec.num_layers))
    skip = torch.zeros(1, n, dtype=torch.bool)
    skip[0, sorted(skipped)] = True
    for ids in prompts:
        cache = engine.new_cache(1, len(ids), layers)
        engine.prefill(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), cache, skip, torch.ones(1, n),
                       want_stats=False)
        for i in layers:
            for kv, scale in ((cache.k[i], both[i][0]), (cache.v[i], both[i][1])):
                assert np.abs(kv[0].numpy() / scale).max() <= INT8_MAX + 1e-3
    for i in layers:  # the union's maxima: never below the unskipped model's, above it somewhere after the skip
        assert all((b >= a - 1e-7).all() for a, b in zip(alone[i], both[i]))
    assert any((b > a * 1.01).any() for i in (2, 3) for a, b in zip(alone[i], both[i]))
    assert fit_kv_scales(engine, prompts, [frozenset(), frozenset()]).keys() == alone.keys()


def test_kv_cache_type_is_refused_where_the_graph_cannot_keep_it(tiny_root):
    """One rule (variants.check_kv_cache) for where a narrow cache can live: the model's head size, a plan the ort
    variant cannot express, a variant that cannot keep it; scales of the wrong shape or not positive and finite are
    refused by the graph."""
    from adaskip.export.onnx.variants import check_kv_cache

    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    odd = replace(model.spec, head_dim=8)
    for kv in ("float16", "int8"):
        with pytest.raises(InputError, match=f"--kv-dtype {kv} keeps the cache .* multiple of 16; this model's is 8"):
            check_kv_cache(odd, kv)
    check_kv_cache(odd, "float32")  # the default needs nothing
    growing = SkipPolicy(baseline_plan("skipdecode", model.spec.num_layers, 4, "decode", model.fingerprint)).layout
    with pytest.raises(InputError, match="which this plan cannot use: the ORT-optimized graph needs"):
        check_kv_cache(model.spec, "int8", growing)
    with pytest.raises(InputError, match="the portable variant cannot keep it"):
        check_kv_cache(model.spec, "int8", _no_skip(model).layout, "portable")
    scales = fit_kv_scales(TorchEngine.from_loaded(model), [list(range(1, 9))])
    for bad in ({**scales, 0: (scales[0][0][:, :, :8], scales[0][1])}, {**scales, 1: (scales[1][0] * 0, scales[1][1])},
                {**scales, 2: (scales[2][0], scales[2][1] * np.nan)}):
        with pytest.raises(InputError, match="must be two .* arrays of positive, finite values"):
            build_onnx(model.spec, model.weights, _no_skip(model).layout, variant="ort", kv_dtype="int8",
                       kv_scales=bad)


def test_build_refuses_an_int8_kv_cache_before_calibrating(tiny_chat_model, tmp_path, capsys):
    """adaskip-build on a model whose head size (8) GroupQueryAttention cannot take: one error line right after
    loading (no calibration, no scale fitting), exit 2, nothing written."""
    from adaskip.cli import build as build_cli

    out = tmp_path / "kv8"
    capsys.readouterr()
    assert build_cli.main(["--model", str(tiny_chat_model), "--skip", "2", "--kv-dtype", "int8", "-o", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "multiple of 16; this model's is 8" in lines[-1] and "Traceback" not in "\n".join(lines)
    assert not any("calibrat" in line or "scales" in line for line in lines[:-1]) and not out.exists()


def test_float16_kv_cache_needs_the_ort_variant(tiny_root):
    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    with pytest.raises(InputError, match="the portable variant cannot keep it"):
        build_onnx(model.spec, model.weights, _no_skip(model).layout, variant="portable", kv_dtype="float16")
    with pytest.raises(InputError, match="KV cache dtype must be one of"):
        build_onnx(model.spec, model.weights, _no_skip(model).layout, variant="ort", kv_dtype="int4")
    with pytest.raises(InputError, match=r"KV cache of type int8 needs fitted scales for every cached layer; none for"):
        build_onnx(model.spec, model.weights, _no_skip(model).layout, variant="ort", kv_dtype="int8")
    scales = fit_kv_scales(TorchEngine.from_loaded(model), [list(range(1, 9))])
    with pytest.raises(InputError, match="KV scales are for a quantized cache"):
        build_onnx(model.spec, model.weights, _no_skip(model).layout, variant="ort", kv_scales=scales)
    for bad, match in ((EngineOptions(kv_dtype="float16", graph_variant="portable"), "--kv-dtype float16"),
                       (EngineOptions(kv_dtype="float16", backend="torch"), "--kv-dtype float16"),
                       (EngineOptions(kv_dtype="bfloat16"), "--kv-dtype must be one of"),
                       (EngineOptions(quantize="int2"), "--quantize must be one of"),
                       (EngineOptions(quantize="int8", backend="torch"), "--quantize int8 is available for the ort")):
        with pytest.raises(InputError, match=match):
            bad.validate()


@pytest.fixture(scope="module")
def gqa_chat_model(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random tied Llama with SmolLM2's tokenizer whose head size (16) GroupQueryAttention takes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("tiny-gqa-chat") / "model"
    torch.manual_seed(2)
    cfg = LlamaConfig(**{**TINY, "vocab_size": 49152, "max_position_embeddings": 2048}, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (smollm2_dir / f).exists():
            shutil.copy(smollm2_dir / f, out / f)
    return out


@pytest.mark.parametrize("weights, kv", [("int8", "float16"), ("int4", "int8")])
def test_build_and_verify_quantized_weights_and_kv_cache(weights, kv, gqa_chat_model, tmp_path, capsys):
    """adaskip-build --quantize Q --kv-dtype D writes an ort-variant engine that adaskip-verify reports (agreement,
    not a 1e-4 judgement; an int8 cache records what its scales were fitted on); a KV dtype the backend cannot keep
    is one line, exit 2, nothing written."""
    from adaskip.cli import build as build_cli
    from adaskip.cli import verify

    out = tmp_path / f"{weights}-kv-{kv}"
    assert build_cli.main(["--model", str(gqa_chat_model), "--method", "early-exit", "--skip", "0",
                           "--quantize", weights, "--kv-dtype", kv, "--calib-prompts", "6", "--calib-tokens", "64",
                           "-o", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["graph"]["variant"] == "ort" and manifest["build"]["graph"]["bits"] == int(weights[3:])
    assert manifest["build"]["options"]["kv_dtype"] == kv
    fitted = manifest["build"].get("kv_scales")
    assert (fitted is not None) == (kv == "int8")
    if fitted:  # the last calibration prompts, at most kv_scales.MAX_PROMPTS of them; nothing skipped in this plan
        assert fitted["prompts"] == 4 and fitted["of"] == 6 and fitted["tokens"] == 64
        assert fitted["source"].startswith("builtin") and fitted["skip_sets"] == [[]]
    capsys.readouterr()
    assert verify.main(["--engine", str(out), "--prompts", "1", "--prompt-tokens", "24", "--decode-steps", "4",
                        "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantize"] == f"{weights}+kv-{kv}" and report["atol"] is None and report["steps"] == 5
    # int4 weights move this tiny model's logits more than int8 ones (tests above: by more than 2x)
    assert report["token_agreement"] >= 0.8 and 0 < report["max_logit_diff"] < {"int8": 0.1, "int4": 0.5}[weights]
    bad = tmp_path / "bad"
    assert build_cli.main(["--model", str(gqa_chat_model), "--method", "early-exit", "--skip", "0",
                           "--backend", "torch", "--kv-dtype", kv, "-o", str(bad), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"--kv-dtype {kv} is available for the ort backend" in err and "Traceback" not in err
    assert not bad.exists()


def test_initializer_bytes_follow_each_element_type():
    """One width rule for every reader of a graph's bytes (the bench's anchors, scripts/decode_profile.py)."""
    from adaskip.export.onnx.quantize import element_bytes, initializer_bytes

    def init(dtype: int, dims: list[int]) -> onnx.TensorProto:
        t = onnx.TensorProto(name="w", data_type=dtype)
        t.dims.extend(dims)
        return t

    assert initializer_bytes(init(onnx.TensorProto.FLOAT, [3, 4])) == 48
    assert initializer_bytes(init(onnx.TensorProto.FLOAT16, [3, 4])) == 24
    assert initializer_bytes(init(onnx.TensorProto.UINT8, [3, 4])) == 12  # MatMulNBits' packed blocks
    assert initializer_bytes(init(onnx.TensorProto.INT4, [8])) == 4
    assert initializer_bytes(init(onnx.TensorProto.INT64, [])) == 8  # a scalar
    assert element_bytes(onnx.TensorProto.UINT4) == 0.5


def test_bench_adds_int8_kv_columns_that_read_a_quarter_of_the_cache(gqa_chat_model, tmp_path):
    """adaskip-bench --int8-kv: ort-kv8 (and with --int4 ort-int4-kv8) timed beside the float32-cache engines; their
    memory floor counts a quarter of the cache's bytes and nothing else changes. With --int4 the spinning pair has an
    int4 twin too (ort-int4-spin: the engines it is compared with spin by default)."""
    from adaskip.cli import bench

    out = tmp_path / "docs"
    assert bench.main(["--model", str(gqa_chat_model), "--contexts", "32", "--budgets", "", "--repeats", "1",
                       "--decode-tokens", "2", "--no-hf", "--no-genai", "--no-llamacpp", "--int4", "--int8-kv",
                       "--calib-prompts", "2", "--calib-tokens", "32", "--out", str(out)]) == 0
    data = json.loads((out / "benchmarks.json").read_text())
    names = [c["name"] for c in data["columns"]]
    assert names == ["torch-reference", "ort", "ort-spin", "ort-int4", "ort-int4-spin", "ort-kv8", "ort-int4-kv8"]
    assert all(data["results"][n]["32"]["decode"] > 0 for n in names)
    step = {c["name"]: c["decode_bytes"]["32"] for c in data["columns"] if c["decode_bytes"]}
    model = load_model(str(gqa_chat_model))
    per_token = model.spec.kv_bytes_per_token(model.spec.num_layers, 4)  # float32 K and V of one position
    for fp32, kv8 in (("ort", "ort-kv8"), ("ort-int4", "ort-int4-kv8")):
        positions = (step[fp32] - step[kv8]) / (per_token * 3 / 4)  # the 32-token context and the new token(s)
        assert positions == int(positions) and 33 <= positions <= 34
    assert "int8 KV cache" in next(c for c in data["columns"] if c["name"] == "ort-int4-kv8")["note"]
    assert step["ort-int4-spin"] == step["ort-int4"] and step["ort-spin"] == step["ort"]
    assert "spinning on" in next(c for c in data["columns"] if c["name"] == "ort-int4-spin")["note"]
