"""The ONNX graph and the ONNX Runtime backend against the reference torch engine."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from conftest import long_text, make_tiny_hf

from adaskip.errors import InputError
from adaskip.export.onnx.graph import build_onnx
from adaskip.export.onnx.save import save_onnx
from adaskip.model import load_model
from adaskip.plan import SkipPlan, baseline_plan
from adaskip.policy import SkipPolicy
from adaskip.runtime.generate import Generator, SamplingParams
from adaskip.runtime.ort_engines import OrtGqaEngine, OrtPortableEngine
from adaskip.runtime.torch_engine import TorchEngine
from adaskip.eval.verify import compare_engines

DATA = Path(__file__).parent / "data"
TOL = 1e-4


VARIANTS = ["portable", "ort"]


def _export(model, policy, out: Path, variant: str = "portable") -> tuple[OrtPortableEngine, dict]:
    out.mkdir(parents=True, exist_ok=True)
    info = save_onnx(build_onnx(model.spec, model.weights, policy.layout, variant=variant), out)  # onnx.checker full
    engine_cls = OrtGqaEngine if variant == "ort" else OrtPortableEngine
    return engine_cls(out / "model.onnx", model.spec, threads=2), info


def _no_skip(model):
    return SkipPolicy(baseline_plan("early-exit", model.spec.num_layers, 0, "e2e", model.fingerprint))


def _parity(model, ort_engine, prompts: list[list[int]], decode_steps: int, policy: SkipPolicy):
    report = compare_engines(TorchEngine.from_loaded(model), ort_engine, policy, prompts, decode_steps, atol=TOL)
    assert report.token_agreement == 1.0
    return report


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "llama-linear-rope", "llama-untied-mha"])
def test_tiny_families_match_the_reference(kind, variant, tiny_root, tmp_path):
    model = load_model(str(make_tiny_hf(kind, tiny_root)))
    policy = _no_skip(model)
    engine, info = _export(model, policy, tmp_path, variant)
    assert info["kv_layers"] == [0, 1, 2, 3] and info["conditionals"] == 0
    torch.manual_seed(0)
    report = _parity(model, engine, torch.randint(0, 320, (2, 24)).tolist(), 6, policy)
    assert report.passed and report.max_logit_diff <= TOL and report.max_similarity_diff <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_families_match_the_reference(kind, variant, tiny_root, tmp_path):
    """Window 8 (all layers for Mistral, the upper two for Qwen2) over 24 prompt tokens + 8 decode steps: the
    portable graph's banded bias and GroupQueryAttention's local_window_size both cut exactly where HF does."""
    model = load_model(str(make_tiny_hf(kind, tiny_root)))
    policy = _no_skip(model)
    engine, _ = _export(model, policy, tmp_path, variant)
    torch.manual_seed(0)
    report = _parity(model, engine, torch.randint(0, 320, (2, 24)).tolist(), 8, policy)
    assert report.passed and report.max_logit_diff <= TOL and report.max_similarity_diff <= TOL


@pytest.fixture(scope="module")
def k8_plan(smollm2) -> SkipPlan:
    """The e2e K=8 plan adaskip-build produced for SmolLM2 with its defaults (20 x 2048 tokens of the built-in
    corpus); stored so these tests do not spend 90 s calibrating. Its fingerprint pins the exact model."""
    plan = SkipPlan.load(DATA / "smollm2-k8-e2e-plan.json")
    plan.check_model(smollm2.fingerprint, 30)
    return plan


def _with_mode(plan: SkipPlan, mode: str) -> SkipPlan:
    d = plan.to_dict()
    d["mode"] = mode
    d["online"]["enabled"] = mode != "prefill"
    return SkipPlan.from_dict(d)


@pytest.mark.parametrize("variant", VARIANTS)
def test_smollm2_graph_structure_for_a_k8_plan(smollm2, k8_plan, tmp_path, variant):
    policy = SkipPolicy(k8_plan)
    out = tmp_path / "g"
    _, info = _export(smollm2, policy, out, variant)
    skipped_attn = sorted(j // 2 for j in k8_plan.skip if j % 2 == 0)
    assert info["kv_layers"] == [i for i in range(30) if i not in skipped_attn]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    assert all(f"past_key_{i}" not in inputs and f"past_value_{i}" not in inputs for i in skipped_attn)
    roles = policy.layout.roles
    sublayer_ifs = [n for n in graph.node if n.op_type == "If" and n.output[0].startswith("sub")]
    assert info["conditionals"] == roles.count("dynamic") == len(sublayer_ifs)
    weights = {t.name for t in graph.initializer}
    for j in (j for j, r in enumerate(roles) if r == "never"):  # removed at export: no weights at all
        roles_of = ("attn_norm", "q", "o") if j % 2 == 0 else ("ffn_norm", "gate", "down")
        assert not any(w.startswith(f"layers.{j // 2}.{r}") for w in weights for r in roles_of)
    def nodes(g):
        for n in g.node:
            yield n
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from nodes(a.g)

    similarity_ops = [n for n in nodes(graph) if n.op_type == "IOSimilarity" and n.domain == "ai.adaskip"]
    assert len(similarity_ops) == roles.count("always") + roles.count("dynamic")  # one per sublayer that can run


@pytest.mark.parametrize("variant", VARIANTS)
def test_smollm2_logits_and_stats_match_the_reference(smollm2, smollm2_tokenizer, k8_plan, tmp_path, variant):
    ids = [smollm2_tokenizer.encode(long_text()[:6000])[:1024]]
    for name, policy in (("none", _no_skip(smollm2)), ("k8", SkipPolicy(k8_plan))):
        engine, _ = _export(smollm2, policy, tmp_path / name, variant)
        report = _parity(smollm2, engine, ids, 8, policy)
        print(f"SmolLM2 ORT {variant} vs reference ({name}): logits {report.max_logit_diff:.2e}, "
              f"stats {report.max_similarity_diff:.2e}")
        assert report.passed and report.max_logit_diff <= TOL and report.max_similarity_diff <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["prefill", "decode", "e2e"])
def test_smollm2_128_greedy_tokens_identical_in_every_mode(smollm2, smollm2_tokenizer, k8_plan, tmp_path, mode,
                                                           variant):
    plan = _with_mode(k8_plan, mode)
    policy = SkipPolicy(plan)
    engine, _ = _export(smollm2, policy, tmp_path, variant)
    # a long real prompt (the language reference) on which the online FFN skipping fires at K=8
    prompt = smollm2_tokenizer.encode(long_text()[40000:43000])[:512]
    params = SamplingParams(max_new_tokens=128, stop_token_ids=())
    ref = Generator(TorchEngine.from_loaded(smollm2), policy, smollm2_tokenizer).generate([prompt], params)[0]
    got = Generator(engine, policy, smollm2_tokenizer).generate([prompt], params)[0]
    assert got.tokens == ref.tokens
    assert got.online_skipped == ref.online_skipped
    if mode != "prefill":
        assert ref.online_skipped, "the online FFN skipping should fire on this prompt"
    assert got.kv_bytes == ref.kv_bytes < ref.kv_bytes_full


@pytest.mark.parametrize("backend", ["torch", "portable", "ort"])
def test_rows_with_different_ffn_masks_equal_their_solo_runs(tiny_root, tmp_path, backend):
    """The batch rule: a row's online FFN decisions apply to that row only (computed for the rows that run it)."""
    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    from test_skipping import _plan_for

    policy = SkipPolicy(_plan_for(model, [3]))  # FFN of layer 1 offline; the other FFNs dynamic (online)
    engine = TorchEngine.from_loaded(model) if backend == "torch" else _export(model, policy, tmp_path, backend)[0]
    n = model.spec.num_sublayers
    ids = torch.randint(0, 320, (2, 9))
    masks = torch.zeros(2, n, dtype=torch.bool)
    masks[:, 3] = True
    masks[0, 5] = True  # row 0 also skips FFN 2, row 1 skips FFN 3
    masks[1, 7] = True
    scales = torch.full((2, n), 1.1)

    def run(rows):
        cache = engine.new_cache(len(rows), 12, policy.layout.cached_layers)
        out = engine.prefill(ids[rows], torch.ones(len(rows), 9, dtype=torch.bool), cache, masks[rows], scales[rows])
        step = engine.decode(out.logits.argmax(-1), cache, masks[rows], scales[rows])
        return out, step

    both = run([0, 1])
    for r in (0, 1):
        solo = run([r])
        for a, b in zip(both, solo):
            assert (a.logits[r] - b.logits[0]).abs().max() <= 1e-5
            assert torch.allclose(a.similarity[r], b.similarity[0], atol=1e-5, equal_nan=True)
    assert torch.isnan(both[0].similarity[0, 5]) and not torch.isnan(both[0].similarity[1, 5])


def test_left_padded_batches_match_solo_runs_in_both_variants(tiny_root, tmp_path):
    """The ORT variant lays left-padded prompts out right-padded for GroupQueryAttention: same tokens as alone."""
    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    from test_skipping import _plan_for

    policy = SkipPolicy(_plan_for(model, [2, 5], window=3))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    params = SamplingParams(max_new_tokens=10, stop_token_ids=())
    ref = [Generator(TorchEngine.from_loaded(model), policy).generate([p], params)[0].tokens for p in prompts]
    for variant in VARIANTS:
        engine, _ = _export(model, policy, tmp_path / variant, variant)
        batch = Generator(engine, policy).generate(prompts, params)
        assert [r.tokens for r in batch] == ref, variant


def test_skipdecode_growth_uses_the_portable_graph(tiny_root, tmp_path):
    from adaskip.export.onnx.variants import choose_variant

    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    growing = SkipPolicy(baseline_plan("skipdecode", 4, 2, "decode", model.fingerprint)).layout
    assert choose_variant(model.spec, growing, "ort") == "portable"
    with pytest.raises(InputError, match="portable"):
        build_onnx(model.spec, model.weights, growing, variant="ort")
    with pytest.raises(InputError, match="portable"):
        choose_variant(model.spec, growing, "ort", requested="ort")
    fp = model.fingerprint
    # e2e grows too (its prefill skips layer 1 only, layer 2 attends in prefill and at decode step 1)
    e2e = SkipPolicy(baseline_plan("skipdecode", 4, 2, "e2e", fp))
    assert choose_variant(model.spec, e2e.layout, "ort") == "portable"
    # one layer (k = 1) is skipped in every forward: nothing grows, the ORT variant takes it
    fixed = SkipPolicy(baseline_plan("skipdecode", 4, 1, "e2e", fp)).layout
    assert choose_variant(model.spec, fixed, "ort") == "ort"
    assert choose_variant(model.spec, fixed, "tensorrt") == "portable"  # TensorRT parses standard ops only
    # e2e on the portable graph: layer 1 removed, layer 2's attention writes its K/V in prefill and at decode step 1
    # through a conditional and is skipped from step 2 on; same tokens and logits as the reference engine
    engine, info = _export(model, e2e, tmp_path)
    assert info["kv_layers"] == [0, 2, 3] and info["conditionals"] > 0
    torch.manual_seed(0)
    report = _parity(model, engine, torch.randint(0, 320, (2, 12)).tolist(), 5, e2e)
    assert report.passed and report.max_logit_diff <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_node_names_say_where_each_node_sits(tiny_root, tmp_path, variant):
    """Every node, inside If branches too, is named by its place (/layers.i/attn|ffn, /stats, /tail, ...) and
    uniquely; a sublayer's conditional sits in its own scope; the manifest records the variant the builder chose."""
    from test_skipping import _plan_for

    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    policy = SkipPolicy(_plan_for(model, [2, 5], mode="decode"))  # attention 1 and FFN 2 conditional
    _, info = _export(model, policy, tmp_path, variant)
    assert info["variant"] == variant and info["conditionals"] == policy.layout.roles.count("dynamic")
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph

    def named(g):
        for n in g.node:
            yield n
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from named(a.g)

    nodes = list(named(graph))
    assert len({n.name for n in nodes}) == len(nodes)
    scopes = {n.name.rsplit("/", 1)[0] for n in nodes}
    layers = {f"/layers.{i}/{part}" for i in range(model.spec.num_layers) for part in ("attn", "ffn")}
    assert layers <= scopes
    assert all(s in layers or s.split("/")[1] in ("inputs", "attention_inputs", "embed", "stats", "tail", "lm_head")
               for s in scopes), scopes
    ifs = {n.output[0].split("_")[0]: n.name for n in graph.node if n.op_type == "If" and n.output[0].startswith("sub")}
    assert ifs["sub2"].startswith("/layers.1/attn/If_") and ifs["sub5"].startswith("/layers.2/ffn/If_")
    assert sum(n.name.startswith("/layers.3/ffn/") and n.op_type == "MatMul" for n in nodes) >= 2  # gate/up, down


@pytest.mark.parametrize("variant", ["torch"] + VARIANTS)
def test_stats_only_when_asked(tiny_root, tmp_path, variant):
    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    policy = _no_skip(model)
    engine = TorchEngine.from_loaded(model) if variant == "torch" else _export(model, policy, tmp_path, variant)[0]
    n = model.spec.num_sublayers
    ids = torch.randint(0, 320, (1, 6))
    for want in (True, False):
        cache = engine.new_cache(1, 8, policy.layout.cached_layers)
        out = engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), cache, torch.zeros(1, n, dtype=torch.bool),
                             torch.ones(1, n), want_stats=want)
        assert bool(torch.isnan(out.similarity).all()) != want
        assert torch.isfinite(out.logits).all()


def test_int4_quantizes_the_ort_variant_too(tiny_root, tmp_path):
    from adaskip.export.onnx.quantize import quantize_int4

    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    policy = _no_skip(model)
    out = tmp_path / "q"
    _export(model, policy, out, "ort")
    info = quantize_int4(out)
    assert info["quantize"] == "int4"
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 4 * 5 + 1  # 4 x (qkv, o, gate, up, down) + head
    engine = OrtGqaEngine(out / "model.onnx", model.spec, threads=2)
    report = compare_engines(TorchEngine.from_loaded(model), engine, policy, [[5, 6, 7, 8]], 3, atol=None)
    assert report.steps == 4 and 0.0 <= report.token_agreement <= 1.0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["decode", "e2e"])
def test_per_channel_compensation_is_baked_into_the_graph(tiny_root, tmp_path, variant, mode):
    """A plan's per-channel stand-ins (scale * h + shift) run in the graph exactly as in the reference engine, for
    sublayers removed at export (e2e) and for conditional ones (decode mode); a wrong channel count is refused."""
    import dataclasses

    from test_skipping import _plan_for

    from adaskip.plan import Compensation

    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    d = model.spec.hidden_size
    g = torch.Generator().manual_seed(1)
    vectors = {j: ((1 + 0.3 * torch.randn(d, generator=g)).tolist(), (0.2 * torch.randn(d, generator=g)).tolist())
               for j in (3, 4)}
    plan = dataclasses.replace(_plan_for(model, [3, 4], mode=mode), compensation=Compensation("channel-affine", vectors))
    policy = SkipPolicy(plan)
    engine, _ = _export(model, policy, tmp_path / "good", variant)
    torch.manual_seed(0)
    prompts = torch.randint(0, 320, (2, 12)).tolist()
    report = compare_engines(TorchEngine.from_loaded(model, plan.compensation), engine, policy, prompts, 6, atol=TOL)
    assert report.passed and report.max_logit_diff <= TOL and report.token_agreement == 1.0
    plain = compare_engines(TorchEngine.from_loaded(model), engine, policy, prompts, 2, atol=TOL)
    assert plain.max_logit_diff > 10 * TOL  # the stand-ins really change the output
    short = dataclasses.replace(plan, compensation=Compensation("channel-affine", {3: ([1.0], [0.0])}))
    with pytest.raises(InputError, match="channels"):
        build_onnx(model.spec, model.weights, SkipPolicy(short).layout, variant=variant)


def test_sessions_do_not_spin_unless_asked():
    from adaskip.runtime.ort_engines import session_options

    assert session_options(2).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(2, spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert session_options(2, spinning=True).get_session_config_entry("session.inter_op.allow_spinning") == "0"


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma3"])
def test_chunked_prefill_equals_one_pass(kind, tiny_root, tmp_path):
    """The ORT variant prefills a long prompt in chunks: same logits and tokens as one pass (sliding windows of 8
    across 7-token chunks too); padded batches and stats requests take one pass."""
    model = load_model(str(make_tiny_hf(kind, tiny_root)))
    from test_skipping import _plan_for

    policy = SkipPolicy(_plan_for(model, [2, 5], window=3))
    out = tmp_path / "g"
    out.mkdir()
    save_onnx(build_onnx(model.spec, model.weights, policy.layout, variant="ort"), out)
    whole = OrtGqaEngine(out / "model.onnx", model.spec, threads=2, prefill_chunk=None)
    chunked = OrtGqaEngine(out / "model.onnx", model.spec, threads=2, prefill_chunk=7)
    torch.manual_seed(0)
    prompt = torch.randint(3, 300, (40,)).tolist()
    n = model.spec.num_sublayers
    logits = []
    for engine in (whole, chunked):
        cache = engine.new_cache(1, 48, policy.layout.cached_layers)
        ids = torch.tensor([prompt])
        res = engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), cache, torch.zeros(1, n, dtype=torch.bool),
                             torch.ones(1, n), want_stats=False)
        assert cache.length == 40 and int(cache.lengths[0]) == 40
        logits.append(res.logits)
    assert (logits[0] - logits[1]).abs().max() <= 1e-5
    params = SamplingParams(max_new_tokens=12, stop_token_ids=())
    ref = Generator(TorchEngine.from_loaded(model), policy).generate([prompt, prompt[:9]], params)
    got = Generator(chunked, policy).generate([prompt], params)[0]
    assert got.tokens == ref[0].tokens
    assert [r.tokens for r in Generator(chunked, policy).generate([prompt, prompt[:9]], params)] == \
        [r.tokens for r in ref]  # unequal rows: one pass
    with pytest.raises(InputError, match="prefill_chunk"):
        OrtGqaEngine(out / "model.onnx", model.spec, prefill_chunk=0)


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_prefill_tail_runs_for_the_last_token_and_changes_nothing(tiny_root, tmp_path, backend, monkeypatch):
    """Attention of layers 2 and 3 skipped: from layer 1's FFN on, a prefill without stats computes each row's last
    token only (last_token_tail); logits, the KV cache and the tokens that follow equal the full prefill's (stats
    on), for a padded batch of unequal prompts and, in the ORT variant, across prefill chunks."""
    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    from test_skipping import _plan_for

    policy = SkipPolicy(_plan_for(model, [4, 6], window=2))  # FFNs dynamic: the online If branches run in the tail
    assert policy.layout.prefill_tail_start == 3
    if backend == "torch":
        engine = TorchEngine.from_loaded(model)
        rows: list[tuple[int, int]] = []  # (layer, tokens) of each FFN computed
        ffn = TorchEngine._ffn
        monkeypatch.setattr(TorchEngine, "_ffn", lambda self, i, h: rows.append((i, h.shape[1])) or ffn(self, i, h))
    else:
        import adaskip.runtime.ort_engines as ort_engine

        def profiled(*args, **kwargs):  # ONNX Runtime's profiler records every kernel's input shapes
            so = plain_options(*args, **kwargs)
            so.enable_profiling, so.profile_file_prefix = True, str(tmp_path / "profile")
            return so

        plain_options = ort_engine.session_options
        monkeypatch.setattr(ort_engine, "session_options", profiled)
        engine, _ = _export(model, policy, tmp_path, "ort")
        engine.prefill_chunk = 7
        graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
        branches = [a.g for node in graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        gate = {node.name: int(node.input[1].split(".")[1]) for g in [graph] + branches for node in g.node
                if node.op_type == "MatMul" and node.input[1].endswith(".gate.T")}  # node -> layer
    reference = TorchEngine.from_loaded(model)
    n = model.spec.num_sublayers
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (2, 20))
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :6] = False  # left padding: a 14-token prompt next to a 20-token one
    skip, scales = torch.zeros(2, n, dtype=torch.bool), torch.full((2, n), 1.1)
    skip[:, [4, 6]] = True
    for batch in ([0, 1], [0]):  # the single row takes the ORT engine's chunked path
        ref_cache = reference.new_cache(len(batch), 24, policy.layout.cached_layers)
        ref = reference.prefill(ids[batch], valid[batch], ref_cache, skip[batch], scales[batch])
        cache = engine.new_cache(len(batch), 24, policy.layout.cached_layers)
        if backend == "torch":
            rows.clear()
        out = engine.prefill(ids[batch], valid[batch], cache, skip[batch], scales[batch], want_stats=False)
        if backend == "torch":
            assert rows == [(0, 20), (1, 1), (2, 1), (3, 1)]
        assert (out.logits - ref.logits).abs().max() <= 1e-5
        for _ in range(3):  # decode goes on from the tail-prefilled cache exactly as from the full one
            token = ref.logits.argmax(-1)
            ref = reference.decode(token, ref_cache, skip[batch], scales[batch])
            out = engine.decode(token, cache, skip[batch], scales[batch])
            assert (out.logits - ref.logits).abs().max() <= 1e-5
    if backend == "ort":  # the gate products' input shapes over both prefills and the decode steps
        events = json.loads(Path(engine.session.end_profiling()).read_text())
        shapes = {(gate[e["name"][:-len("_kernel_time")]], tuple(e["args"]["input_type_shape"][0]["float"]))
                  for e in events if e.get("cat") == "Node" and e["name"][:-len("_kernel_time")] in gate}
        # layer 0: the whole prompt (one pass of 20 for unequal rows, chunks of 7 + 7 + 6 for one row), then decode
        assert shapes == {(0, (2, 20, 64)), (0, (1, 7, 64)), (0, (1, 6, 64))} | {
            (i, (b, 1, 64)) for i in range(4) for b in (1, 2)}

