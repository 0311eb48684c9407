"""adaskip-eval: metrics on hand-made cases, deterministic task generators, compensation fits on synthetic data,
plans with compensation, exact work sharing, and small end-to-end runs (tiny random model and real SmolLM2)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adaskip.errors import InputError, PlanError
from adaskip.plan import Calibration, Compensation, SkipPlan, adaskip_plan
from adaskip.calibrate import compensation as comp
from adaskip.calibrate import tasks
from adaskip.eval import metrics, report
from adaskip.eval.runner import EvalOptions, PrefixCache, mask_schedule, parse_method, prompt_is_chat


# -- metrics -------------------------------------------------------------------------------------------------------

def test_exact_match_hand_cases():
    assert metrics.exact_match(" 58401.", "58401") == 1.0
    assert metrics.exact_match(' "11617".', "11617") == 1.0  # quotes and the full stop are not part of the answer
    assert metrics.exact_match(": amber-falcon, I think", "Amber-Falcon") == 1.0
    assert metrics.exact_match(" 5840", "58401") == 0.0  # a prefix is not the answer
    assert metrics.exact_match(" 584011", "58401") == 0.0
    assert metrics.exact_match(" The answer is 58401", "58401") == 0.0  # the first word must be the answer
    assert metrics.exact_match("", "58401") == 0.0
    assert metrics.exact_match("anything", "") == 0.0


def test_rouge_l_hand_cases():
    assert metrics.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # LCS("the cat sat", "the cat sat on the mat") = 3: precision 3/3, recall 3/6 -> F = 2/3
    assert metrics.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    # LCS = "the ... the mat" (3 of 4 and 3 of 6 words): P = 3/4, R = 1/2 -> F = 2 * 3/8 / (5/4) = 0.6
    assert metrics.rouge_l("the dog the mat", "the cat sat on the mat") == pytest.approx(0.6)
    assert metrics.rouge_l("red green", "blue yellow") == 0.0
    assert metrics.rouge_l("", "") == 1.0 and metrics.rouge_l("", "text") == 0.0


def test_perplexity_and_nll_hand_cases():
    assert metrics.perplexity([math.log(2.0), math.log(2.0)]) == pytest.approx(2.0)
    assert metrics.perplexity([0.0, math.log(4.0)]) == pytest.approx(2.0)  # exp of the mean, not mean of exps
    uniform = torch.zeros(3, 4)
    assert metrics.token_nll(uniform, torch.tensor([0, 1, 3])).tolist() == pytest.approx([math.log(4)] * 3)
    sure = torch.tensor([[0.0, 100.0]])
    assert metrics.token_nll(sure, torch.tensor([1])).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        metrics.perplexity([])


def test_kl_divergence_hand_cases():
    p = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    q = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl = comp.kl_divergence(p, q)
    assert kl[0].item() == pytest.approx(expected) and kl[1].item() == pytest.approx(0.0, abs=1e-12)
    assert comp.kl_divergence(q, p)[0].item() != pytest.approx(expected)  # not symmetric
    logits = torch.randn(5, 11)
    assert comp.kl_divergence(logits, logits + 3.0).abs().max().item() < 1e-12  # logits shift: same softmax


# -- tasks ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", tasks.TASKS)
def test_task_generators_are_deterministic_and_seeded(smollm2_tokenizer, task):
    a = tasks.make_samples(smollm2_tokenizer, task, 512, 2, seed=3)
    b = tasks.make_samples(smollm2_tokenizer, task, 512, 2, seed=3)
    c = tasks.make_samples(smollm2_tokenizer, task, 512, 2, seed=4)
    key = lambda ss: [(s.prefix, [(q.suffix, q.answer) for q in s.queries], s.target) for s in ss]  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)
    assert key(a)[0] != key(a)[1]  # two documents of one seed differ too


@pytest.mark.parametrize("task,context", [("passkey", 512), ("multikey", 1024), ("kv", 768), ("summary", 1024),
                                          ("passkey", 8192), ("multikey", 4096), ("summary", 8192)])
def test_prompt_lengths(smollm2_tokenizer, task, context):
    for s in tasks.make_samples(smollm2_tokenizer, task, context, 2, seed=1):
        lengths = [len(s.prefix) + len(q.suffix) for q in s.queries]
        assert max(lengths) == context  # assembled at the token level: the longest prompt is exact
        assert min(lengths) >= context - 16  # other questions differ by a few tokens only


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_needle_is_in_the_haystack_at_its_depth(smollm2_tokenizer, depth):
    tok = smollm2_tokenizer
    s = tasks.passkey(tok, 1024, seed=7, depth=depth)
    key = s.queries[0].answer
    needle = s.meta["needles"][0]
    ids = s.prefix[needle["offset"]:needle["offset"] + needle["length"]]
    assert tok.decode(ids).strip() == f"The pass key is {key}. Remember it. {key} is the pass key."
    text = tok.decode(s.prefix)
    assert text.count(key) == 2  # only the needle carries the key
    head = needle["offset"] - (len(s.prefix) - needle["length"] - s.meta["haystack_tokens"])
    assert abs(head / s.meta["haystack_tokens"] - depth) < 0.05  # inserted at the nearest sentence end
    with pytest.raises(InputError):
        tasks.passkey(tok, 1024, depth=1.5)


def test_multikey_and_kv_needles_answer_their_questions(smollm2_tokenizer):
    tok = smollm2_tokenizer
    mk = tasks.multikey(tok, 1024, seed=2)
    text = tok.decode(mk.prefix)
    assert len(mk.queries) == 4 and len({q.answer for q in mk.queries}) == 4
    for q in mk.queries:
        assert f"special magic numbers for {q.key} is: {q.answer}." in text
        assert q.key in tok.decode(q.suffix)
    depths = sorted(n["offset"] for n in mk.meta["needles"])
    assert depths[0] < len(mk.prefix) / 2 < depths[-1]  # spread through the document
    kv = tasks.kv(tok, 1024, seed=2)
    text = tok.decode(kv.prefix)
    block = text[text.index("{"):text.index("}") + 1]
    pairs = json.loads(block)
    assert len(pairs) == 4 and all(pairs[q.key] == q.answer for q in kv.queries)


def test_summary_sample_carries_real_lm_target(smollm2_tokenizer):
    s = tasks.summary(smollm2_tokenizer, 1024, seed=0, lm_tokens=24)
    assert len(s.target) == 24 and s.queries[0].suffix[:24] == s.target  # the document's own last tokens
    assert "Summarize" in smollm2_tokenizer.decode(s.queries[0].suffix)


def test_eval_text_is_not_calibration_text(smollm2_tokenizer):
    from adaskip.calibrate.corpus import builtin_text

    corpus = builtin_text()
    assert tasks.TASK_REGION[1] <= tasks.HELDOUT_REGION[0]  # task and held-out regions are disjoint
    before = corpus[:int(tasks.TASK_REGION[0] * len(corpus))]
    # the calibration windows (the build's default: at most 20 x 2048 tokens from the start) end before it
    assert len(smollm2_tokenizer.encode(before, add_special_tokens=False)) > 20 * 2048
    assert corpus.index(tasks.region_paragraphs(tasks.TASK_REGION)[0]) > 0.4 * len(corpus)


def test_task_errors(smollm2_tokenizer):
    with pytest.raises(InputError, match="unknown task"):
        tasks.make_samples(smollm2_tokenizer, "sudoku", 512, 1)
    with pytest.raises(InputError, match="at least"):
        tasks.passkey(smollm2_tokenizer, 64)



@pytest.mark.parametrize("task", tasks.TASKS)
def test_plain_prompts_for_base_models(smollm2_tokenizer, task):
    """chat=False: no chat template; the prompt is plain text ending in "Answer:" (plus the answer prefix), and it
    is still exactly the requested length."""
    chat = tasks.make_samples(smollm2_tokenizer, task, 512, 1, seed=2)[0]
    plain = tasks.make_samples(smollm2_tokenizer, task, 512, 1, seed=2, chat=False)[0]
    text = smollm2_tokenizer.decode(plain.prefix + plain.queries[0].suffix)
    assert "<|im_start|>" in smollm2_tokenizer.decode(chat.prefix) and "<|im_start|>" not in text
    assert "\n\nAnswer:" in text
    assert all(len(plain.prefix) + len(q.suffix) <= 512 for q in plain.queries)
    assert max(len(plain.prefix) + len(q.suffix) for q in plain.queries) == 512
    assert [q.answer for q in plain.queries] == [q.answer for q in chat.queries]


def test_prompt_format_resolution(smollm2_tokenizer):
    class NoTemplate:
        chat_template = None

    assert prompt_is_chat("auto", "smollm2-135m", smollm2_tokenizer)  # instruction-tuned, ships a template
    assert not prompt_is_chat("auto", "gemma3-270m", smollm2_tokenizer)  # built-in base model: template attached
    assert not prompt_is_chat("auto", "/some/hf/dir", NoTemplate())
    assert prompt_is_chat("chat", "gemma3-270m", smollm2_tokenizer)
    assert not prompt_is_chat("plain", "smollm2-135m", smollm2_tokenizer)
    with pytest.raises(InputError, match="chat template"):
        tasks.passkey(NoTemplate(), 512, chat=True)


def test_quality_document_keeps_one_section_per_model():
    legacy = "# Quality at equal budget: old\n\nsingle-model report\n"
    doc = report.merge_section(legacy, "smollm2-135m", "## smollm2-135m\nfirst")
    assert "single-model report" not in doc and doc.startswith(report.DOC_TITLE)
    doc = report.merge_section(doc, "gemma3-270m", "## gemma3-270m\ng")
    doc = report.merge_section(doc, "smollm2-135m", "## smollm2-135m\nsecond")
    assert "first" not in doc and doc.count("## smollm2-135m") == 1 and doc.count("## gemma3-270m") == 1
    assert doc.index("second") < doc.index("## gemma3-270m")  # a rewritten section keeps its place


# -- compensation fits on synthetic data ------------------------------------------------------------------------

def _stats_for(h: torch.Tensor, out: torch.Tensor, j: int = 0, sublayers: int = 2) -> comp.ChannelStats:
    stats = comp.ChannelStats.zeros(sublayers, h.shape[-1])
    stats.observe(j, h, out, torch.ones(h.shape[:2], dtype=torch.bool))
    return stats


def _calib(n: int = 2) -> Calibration:
    return Calibration(similarity=[0.9] * n, norm_ratio=[1.5] * n, num_prompts=1, prompt_tokens=8,
                       data_digest="x", source="synthetic")


def test_channel_scale_recovers_a_known_per_channel_scale():
    torch.manual_seed(0)
    h = torch.randn(2, 300, 6)
    a = torch.tensor([0.5, 1.0, 2.0, -1.0, 3.0, 0.1])
    _, c = comp.fit("channel-scale", _stats_for(h, h * a), _calib())
    scale, shift = c.sublayers[0]
    assert scale == pytest.approx(a.tolist(), rel=1e-5) and shift == pytest.approx([0.0] * 6)


def test_channel_affine_recovers_scale_and_shift_despite_a_sink_token():
    torch.manual_seed(0)
    h = torch.randn(3, 400, 5) + 2.0
    a, b = torch.tensor([0.9, 1.1, 1.0, 0.5, 2.0]), torch.tensor([0.3, -1.0, 0.0, 4.0, 0.2])
    out = h * a + b + 1e-3 * torch.randn_like(h)
    h[:, 0] *= 1000.0  # each prompt's first token: a huge-norm sink that does not follow the map
    out[:, 0] = -h[:, 0]
    _, c = comp.fit("channel-affine", _stats_for(h, out), _calib())
    scale, shift = c.sublayers[0]
    assert scale == pytest.approx(a.tolist(), abs=1e-3) and shift == pytest.approx(b.tolist(), abs=1e-2)


def test_token_ratio_is_the_mean_of_per_token_ratios_and_norm_ratio_is_the_papers():
    h = torch.ones(1, 4, 3)
    out = h.clone()
    out[0, 0] *= 10.0  # one high-norm output token: the Frobenius ratio follows it, the token mean much less
    stats = _stats_for(h, out)
    scales, c = comp.fit("token-ratio", stats, _calib())
    assert scales[0] == pytest.approx((10 + 1 + 1 + 1) / 4) and c.rule == "token-ratio" and not c.sublayers
    scales, c = comp.fit("norm-ratio", stats, _calib())
    assert scales == [1.5, 1.5] and c is None  # the calibration's own (paper) ratios
    with pytest.raises(ValueError):
        comp.fit("magic", stats, _calib())


# -- plans and the engine rule ---------------------------------------------------------------------------------

def test_plan_with_compensation_round_trips_as_version_2_and_v1_files_still_load(tmp_path):
    calib = Calibration(similarity=[0.5, 0.9, 0.8, 0.95], norm_ratio=[1.0] * 4, num_prompts=1, prompt_tokens=8,
                        data_digest="x", source="s")
    c = Compensation("channel-affine", {j: ([1.0, 2.0], [0.5, -0.5]) for j in range(4)})
    plan = adaskip_plan(calib, 2, "e2e", "fp", compensation=c)
    assert sorted(plan.compensation.sublayers) == [1, 3]  # vectors kept for the offline set only
    d = plan.to_dict()
    assert d["version"] == 2
    plan.save(tmp_path / "p.json")
    again = SkipPlan.load(tmp_path / "p.json")
    assert again.compensation == plan.compensation and again.digest() == plan.digest()
    plain = adaskip_plan(calib, 2, "e2e", "fp")
    assert plain.to_dict()["version"] == 1 and "compensation" not in plain.to_dict()
    old = SkipPlan.load("tests/data/smollm2-k8-e2e-plan.json")
    assert old.compensation is None
    bad = dict(d, version=1)
    with pytest.raises(PlanError, match="version 1"):
        SkipPlan.from_dict(bad)
    stray = json.loads(json.dumps(d))
    stray["compensation"]["sublayers"]["0"] = {"scale": [1.0, 1.0], "shift": [0.0, 0.0]}  # not skipped
    with pytest.raises(PlanError, match="sublayer 0"):
        SkipPlan.from_dict(stray)


def test_kl_selection_order_and_beta():
    calib = Calibration(similarity=[0.5, 0.9, 0.8, 0.95], norm_ratio=[1.0] * 4, num_prompts=1, prompt_tokens=8,
                        data_digest="x", source="s")
    plan = adaskip_plan(calib, 2, "e2e", "fp", order=[0, 2, 1, 3])
    assert plan.skip == [0, 2] and plan.beta == 0.9  # beta stays the K-th largest similarity
    assert adaskip_plan(calib, 2, "e2e", "fp").beta == 0.9
    with pytest.raises(PlanError):
        adaskip_plan(calib, 2, "e2e", "fp", order=[0, 0, 1])


def test_engine_applies_per_channel_compensation(tiny_root):
    from conftest import make_tiny_hf

    from adaskip.model import load_model
    from adaskip.runtime.torch_engine import TorchEngine

    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    d, n = model.spec.hidden_size, model.spec.num_sublayers
    ids = torch.randint(0, 320, (1, 9))
    skip = torch.zeros(1, n, dtype=torch.bool)
    skip[0, 3] = True
    scales = torch.full((1, n), 1.3)

    def logits(compensation):
        engine = TorchEngine(model.spec, model.weights, compensation)
        cache = engine.new_cache(1, 9, list(range(model.spec.num_layers)))
        return engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), cache, skip, scales).logits

    scalar = logits(None)
    same = logits(Compensation("channel-scale", {3: ([1.3] * d, [0.0] * d)}))
    assert torch.allclose(scalar, same, atol=1e-6)  # a constant per-channel scale is the scalar rule
    shifted = logits(Compensation("channel-affine", {3: ([1.3] * d, [0.2] * d)}))
    assert not torch.allclose(scalar, shifted, atol=1e-3)

    # the observer sees every sublayer that ran, with its input and output
    seen = []
    engine = TorchEngine(model.spec, model.weights)
    engine.observer = lambda j, h, out, valid: seen.append((j, h.shape, out.shape))
    cache = engine.new_cache(1, 9, list(range(model.spec.num_layers)))
    engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), cache, skip, scales)
    assert [j for j, _, _ in seen] == [j for j in range(n) if j != 3]


# -- work sharing is exact ----------------------------------------------------------------------------------------

def test_scoring_forward_resumes_and_heads_only_the_scored_rows_exactly(tiny_root):
    """The selection's scoring forward: logits at chosen positions equal those rows of every position's logits;
    resumed at a sublayer from the full model's input there, it equals the forward from the start (bit for bit:
    the same ops on the same inputs) under a skip set from that sublayer on, and it refuses one that skips before.
    The greedy selection's scorers give the same numbers with and without resuming, per-channel stand-ins on."""
    from conftest import make_tiny_hf

    from adaskip.model import load_model
    from adaskip.runtime.torch_engine import TorchEngine

    model = load_model(str(make_tiny_hf("gemma3", tiny_root)))  # sliding-window and global layers
    engine = TorchEngine(model.spec, model.weights)
    n, d = model.spec.num_sublayers, model.spec.hidden_size
    ids = [(7 * i) % 300 + 3 for i in range(48)]
    scales = [0.9] * n
    everything = engine.teacher_forced_logits(ids, [3], scales)
    assert everything.shape == (48, model.spec.vocab_size)
    some = engine.teacher_forced_logits(ids, [3], scales, logits_at=[5, 40, 47])
    assert torch.allclose(some, everything[[5, 40, 47]], atol=1e-6, rtol=1e-6)

    full, inputs = engine.sublayer_inputs(ids, [2, 3, 5])
    assert sorted(inputs) == [2, 3, 5] and inputs[3].shape == (1, 48, d)
    assert torch.equal(full, engine.teacher_forced_logits(ids, [], [1.0] * n))  # the reference, in the same pass
    assert torch.allclose(engine.sublayer_inputs(ids, [], [5, 40])[0], full[[5, 40]], atol=1e-6, rtol=1e-6)
    for j, skip in ((2, [2, 6]), (3, [3]), (3, [3, 5, 7]), (5, [5])):
        resumed = engine.teacher_forced_logits(ids, skip, scales, resume=(j, inputs[j]))
        assert torch.equal(resumed, engine.teacher_forced_logits(ids, skip, scales)), (j, skip)
    assert torch.equal(engine.teacher_forced_logits(ids, [], scales, resume=(5, inputs[5])),
                       engine.teacher_forced_logits(ids, [], scales))
    with pytest.raises(ValueError, match="skip one before"):
        engine.teacher_forced_logits(ids, [2, 5], scales, resume=(5, inputs[5]))

    comp_rule = Compensation("channel-affine", {j: ([1.1] * d, [0.01] * d) for j in range(n)})
    windows = [ids, [(5 * i) % 300 + 3 for i in range(32)]]
    probes = [comp.Probe(ids, [40, 41, 42], targets=[1, 2, 3]), comp.Probe(windows[1], [20, 21])]
    candidates = [2, 3, 5, 6]
    plain_text, resumed_text = comp.WindowScorer(engine, windows), comp.WindowScorer(engine, windows,
                                                                                     resume_at=candidates)
    plain_probes, resumed_probes = comp.ProbeScorer(engine, probes), comp.ProbeScorer(engine, probes, candidates)
    for skip in ([2], [5, 3], [6, 2, 5], [0, 3], [1]):  # [0, 3] and [1]: no stored input, from the start
        assert resumed_text.kl(skip, scales, comp_rule) == plain_text.kl(skip, scales, comp_rule)
        assert resumed_probes.score(skip, scales, comp_rule) == plain_probes.score(skip, scales, comp_rule)
        assert plain_text.kl(skip, scales, comp_rule) > 0


def test_prefix_cache_gives_the_same_tokens_as_a_plain_prefill(tiny_chat_model):
    from adaskip.model import load_model
    from adaskip.plan import baseline_plan
    from adaskip.policy import SkipPolicy
    from adaskip.runtime.generate import Generator, SamplingParams
    from adaskip.runtime.torch_engine import TorchEngine

    model = load_model(str(tiny_chat_model))
    calib = Calibration(similarity=[0.1 * j for j in range(8)], norm_ratio=[1.1] * 8, num_prompts=1,
                        prompt_tokens=8, data_digest="x", source="s")
    torch.manual_seed(0)
    prefix = torch.randint(3, 49152, (40,)).tolist()
    plans = [adaskip_plan(calib, 2, mode, model.fingerprint, window=2) for mode in ("prefill", "decode", "e2e")]
    plans.append(baseline_plan("skipdecode", 4, 1, "decode", model.fingerprint))
    for plan in plans:
        engine = TorchEngine.from_loaded(model)
        cached = PrefixCache(engine)
        cached.register(prefix)
        params = SamplingParams(max_new_tokens=6, stop_token_ids=())
        for suffix in ([5, 6, 7], [8, 9]):
            plain = Generator(engine, SkipPolicy(plan)).generate([prefix + suffix], params)[0].tokens
            shared = Generator(cached, SkipPolicy(plan)).generate([prefix + suffix], params)[0].tokens
            assert plain == shared, plan.mode
        assert cached.hits == 1  # the second query reused the document's K/V


def test_mask_schedule_only_when_no_online_step_can_fire():
    from adaskip.policy import SkipPolicy

    calib = Calibration(similarity=[0.1 * j for j in range(8)], norm_ratio=[1.1] * 8, num_prompts=1,
                        prompt_tokens=8, data_digest="x", source="s")
    policy = SkipPolicy(adaskip_plan(calib, 2, "e2e", "fp", window=4))
    assert mask_schedule(policy, 4) is not None and mask_schedule(policy, 5) is None
    prefill = SkipPolicy(adaskip_plan(calib, 2, "prefill", "fp", window=4))
    assert mask_schedule(prefill, 50) is not None  # no online step in prefill mode


def test_method_names():
    assert parse_method("adaskip").is_reference
    m = parse_method("adaskip+channel-affine+kl+no-online")
    assert (m.rule, m.selection, m.online) == ("channel-affine", "kl", False)
    assert parse_method("adaskip-best", best=("channel-scale", "kl")).rule == "channel-scale"
    assert parse_method("adaskip+task-calib+ffn").kind == "ffn"
    for bad in ("adaskip+turbo", "layerdrop", "adaskip+kl+attn"):
        with pytest.raises(InputError):
            parse_method(bad)
    with pytest.raises(InputError, match="study"):
        parse_method("adaskip-best")


# -- end to end ------------------------------------------------------------------------------------------------------

def _eval(argv: list[str]) -> int:
    from adaskip.cli.eval import main

    return main(argv)


def test_eval_end_to_end_tiny_with_study_and_ablations(tiny_chat_model, tmp_path):
    out = tmp_path / "tiny"
    small = ["--model", str(tiny_chat_model), "--contexts", "256", "--samples", "1", "--calib-prompts", "2",
             "--calib-tokens", "256", "--study-windows", "1", "--study-tokens", "128", "--kl-tokens", "64",
             "--kl-candidates", "3", "--summary-tokens", "6", "--lm-tokens", "6", "--out", str(out), "-q"]
    assert _eval(small + ["--methods", "adaskip-best,adaskip+ffn+task-calib,unified", "--budgets", "1,2",
                          "--modes", "e2e"]) == 0
    data = json.loads((out / "quality.json").read_text())
    methods = {(r["method"], r["k"]) for r in data["rows"]}
    assert ("full", 0) in methods and ("adaskip-best", 1) in methods and ("adaskip+ffn+task-calib", 2) in methods
    assert ("unified", 2) in methods and ("unified", 1) not in methods  # odd K: no whole-layer equivalent
    assert set(data["study"]["kl"]) >= {f"{r}/similarity" for r in comp.RULES}
    assert (out / "quality.png").stat().st_size > 0 and "adaskip-best" in (out / "quality.md").read_text()
    # ideal decode speedups over each generation's own decode steps (8-token answers: 7; 6-token summaries and LM
    # targets: 5), stated in the report
    assert data["decode_steps"] == {"kv": [7], "lm": [5], "multikey": [7], "passkey": [7], "summary": [5]}
    assert "decode: over each generation's own decode steps (kv 7, lm 5, multikey 7, passkey 7, summary 5)" in \
        (out / "quality.md").read_text()
    plan = SkipPlan.load(out / "plans" / "adaskip-best-K2-e2e.json")  # what adaskip-build --plan takes
    assert plan.k == 2 and plan.mode == "e2e" and plan.selection["compensation"] == data["study"]["best"][0]
    assert _eval(small + ["--methods", "adaskip", "--budgets", "2", "--modes", "nope"]) == 2  # clear error
    (out / "quality.md").unlink()
    assert _eval(small + ["--report-only", "--notes", str(out / "nonexistent.md")]) == 2
    notes = tmp_path / "notes.md"
    notes.write_text("## Reading\n\nHand-written reading.")
    assert _eval(small + ["--report-only", "--notes", str(notes)]) == 0
    assert "Hand-written reading." in (out / "quality.md").read_text()
    assert _eval(["--model", str(tiny_chat_model), "--out", str(tmp_path / "empty"), "--report-only", "-q"]) == 2


def test_eval_of_a_built_engine_directory(tiny_chat_model, tmp_path):
    """--engine: a built engine (its own plan, here a baseline) is one more row next to the same configuration."""
    from adaskip.builder.build import build
    from adaskip.builder.options import BuildOptions, EngineOptions, SelectionOptions

    engine = tmp_path / "engine"
    build(BuildOptions(model=str(tiny_chat_model), output=str(engine),
                       selection=SelectionOptions(method="early-exit", skip=1, mode="prefill"),
                       engine=EngineOptions(backend="torch"), progress=False))
    out = tmp_path / "out"
    argv = ["--model", str(tiny_chat_model), "--engine", str(engine), "--methods", "early-exit", "--budgets", "2",
            "--modes", "prefill", "--contexts", "256", "--tasks", "passkey,summary", "--samples", "1",
            "--calib-prompts", "2", "--calib-tokens", "256", "--summary-tokens", "6", "--lm-tokens", "6",
            "--out", str(out), "-q"]
    assert _eval(argv) == 0
    rows = {r["method"]: r for r in json.loads((out / "quality.json").read_text())["rows"]}
    ours, same = rows["engine:engine"], rows["early-exit"]
    assert (ours["k"], ours["mode"], ours["skipped"]) == (2, "prefill", 2)
    for col in ("passkey", "rougeL", "ppl", "kl"):  # the same plan through the engine dir: the same numbers
        assert ours[col] == pytest.approx(same[col], rel=1e-4, abs=1e-6)


def test_eval_end_to_end_smollm2(smollm2_dir, tmp_path):
    """Real model at 256 tokens: the full model finds the pass key, is its own reference, and a rerun resumes."""
    out = tmp_path / "smol"
    argv = ["--model", "smollm2-135m", "--methods", "adaskip,early-exit", "--budgets", "2", "--modes", "e2e",
            "--contexts", "256", "--tasks", "passkey,summary", "--samples", "1", "--calib-prompts", "2",
            "--calib-tokens", "256", "--summary-tokens", "8", "--lm-tokens", "8", "--out", str(out), "-q",
            "--doc", str(tmp_path / "docs" / "quality.md")]
    assert _eval(argv) == 0
    data = json.loads((out / "quality.json").read_text())
    rows = {(r["method"], r["mode"]): r for r in data["rows"]}
    full = rows[("full", "prefill")]
    assert full["passkey"] == 1.0 and full["rougeL"] == 1.0 and full["kl"] == pytest.approx(0.0, abs=1e-9)
    assert rows[("adaskip", "e2e")]["skipped"] == 2 and rows[("early-exit", "e2e")]["skipped"] == 2
    assert 1.0 < full["ppl"] < 1000.0
    doc = (tmp_path / "docs" / "quality.md").read_text()
    assert "<!-- adaskip-eval: smollm2-135m -->" in doc and "### Results at 256 tokens" in doc
    assert (tmp_path / "docs" / "quality-smollm2-135m.png").is_file()
    results = next(out.glob("results-*.jsonl"))
    before = results.read_text()
    assert _eval(argv) == 0  # everything cached: nothing recomputed, nothing appended
    assert results.read_text() == before


def test_questions_per_document_match_the_generators(smollm2_tokenizer):
    for task, n in tasks.QUESTIONS_PER_DOCUMENT.items():
        assert len(tasks.GENERATORS[task](smollm2_tokenizer, 512, seed=3).queries) == n


def test_retrieval_aware_selection_is_seeded_and_disjoint_from_the_evaluation(tiny_chat_model, smollm2_tokenizer):
    """The `ret` objective's probes come from held-out seeds (never an evaluated document), its answer positions
    predict the answer's tokens, and the greedy order it gives is the same for the same seed."""
    from adaskip.model import load_model
    from adaskip.runtime.torch_engine import TorchEngine

    probes = tasks.answer_probes(smollm2_tokenizer, 256, 4, seed=0)
    again = tasks.answer_probes(smollm2_tokenizer, 256, 4, seed=0)
    assert [(p.ids, p.positions) for p in probes] == [(p.ids, p.positions) for p in again]
    assert [p.ids for p in tasks.answer_probes(smollm2_tokenizer, 256, 4, seed=1)] != [p.ids for p in probes]
    evaluated = {tuple(s.prefix) for t in tasks.RETRIEVAL for s in tasks.make_samples(smollm2_tokenizer, t, 256, 4)}
    assert not any(tuple(p.ids[:len(e)]) == e for p in probes for e in evaluated)
    first = tasks.passkey(smollm2_tokenizer, 256, seed=tasks.PROBE_SEED_OFFSET, index=0)
    answer = smollm2_tokenizer.encode(" " + first.queries[0].answer, add_special_tokens=False)
    p = probes[0]
    assert p.ids[p.positions[0] + 1:] == answer[:-1] and len(p.positions) == len(answer)
    assert len(p.ids) == len(first.prefix) + len(first.queries[0].suffix) + len(answer) - 1

    model = load_model(str(tiny_chat_model))
    windows = [[(5 * i) % 300 + 3 for i in range(64)]]
    scales = [1.0] * model.spec.num_sublayers
    probes = tasks.answer_probes(smollm2_tokenizer, 256, 3, seed=7)
    orders = [comp.kl_greedy_order(TorchEngine.from_loaded(model), windows, 3, list(range(8)), scales, None,
                                   progress=False, probes=probes) for _ in range(2)]
    assert orders[0] == orders[1] and len(set(orders[0])) == 3
    assert parse_method("adaskip+ret").selection == "kl-ret"
    assert parse_method("adaskip+ret").probe_tokens is None
    long = parse_method("adaskip+channel-affine+ret1024")
    assert (long.selection, long.probe_tokens, long.rule) == ("kl-ret", 1024, "channel-affine")
    for bad in ("adaskip+ret+ffn", "adaskip+ret64", "adaskip+retx", "adaskip+ret-1"):
        with pytest.raises(InputError):
            parse_method(bad)


def test_decode_phase_scoring_is_what_decode_mode_serves(tiny_chat_model, smollm2_tokenizer):
    """`served` in decode mode: a probe's prompt runs through the full model and only the tokens after it skip; the
    scorer's KL (one cached prefix, one suffix chunk) equals the KL of a prefill then one decode step per token with
    the plan's mask, and it leaves the cached prefix reusable (the same score twice, in any order)."""
    from adaskip.model import load_model
    from adaskip.runtime.torch_engine import TorchEngine

    model = load_model(str(tiny_chat_model))
    engine = TorchEngine.from_loaded(model)
    n, layers = model.spec.num_sublayers, model.spec.num_layers
    ids = [(7 * i) % 300 + 3 for i in range(40)]
    probe = comp.Probe(ids, list(range(30, 40)), prefix=30)
    skip, scales = [0, 3], [0.9] * n

    cache = engine.new_cache(1, len(ids), list(range(layers)))
    x = torch.tensor([ids[:30]])
    out = engine.prefill(x, torch.ones_like(x, dtype=torch.bool), cache, torch.zeros(1, n, dtype=torch.bool),
                         torch.ones(1, n), want_stats=False)
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, skip] = True
    stepped = []
    for t in ids[30:]:  # teacher-forced decode steps: step t's logits predict the token after ids[t]
        stepped.append(engine.decode(torch.tensor([t]), cache, mask, torch.tensor([scales]), want_stats=False).logits)
    full = engine.prefill(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool),
                          engine.new_cache(1, len(ids), []), torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n),
                          all_logits=True, want_stats=False).logits[0]
    expected = float(comp.kl_divergence(full[30:], torch.cat(stepped)).mean())
    assert expected > 1e-4  # the skips change the decode steps

    scorer = comp.ProbeScorer(engine, [probe])
    assert scorer.kl(skip, scales, None) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert scorer.kl([], scales, None) == pytest.approx(0.0, abs=1e-6)  # nothing skipped: the full model
    assert scorer.kl(skip, scales, None) == pytest.approx(expected, rel=1e-4, abs=1e-6)  # prefix left intact
    everywhere = comp.ProbeScorer(engine, [comp.Probe(ids, list(range(30, 40)))]).kl(skip, scales, None)
    assert everywhere != pytest.approx(expected, rel=1e-3)  # the prompt's skips (e2e) move the answers too
    with pytest.raises(ValueError):  # a position inside the unskipped prefix has nothing to score
        comp.ProbeScorer(engine, [comp.Probe(ids, [29, 30], prefix=30)])

    # decode-phase answer probes: the prompt is the prefix, the answer's tokens after the first are scored
    probes = tasks.answer_probes(smollm2_tokenizer, 256, 3, seed=7, phase="decode")
    plain = tasks.answer_probes(smollm2_tokenizer, 256, 3, seed=7)
    for d, a in zip(probes, plain):
        assert d.ids == a.ids and d.prefix == a.positions[0] + 1 and d.positions == a.positions[1:]
        assert d.targets == a.targets[1:] and len(a.targets) == len(a.positions)  # the answer's tokens
    windows = [[(5 * i) % 300 + 3 for i in range(64)]]
    orders = [comp.kl_greedy_order(engine, windows, 3, list(range(8)), scales, None, progress=False,
                                   probes=probes, phase="decode") for _ in range(2)]
    assert orders[0] == orders[1] and len(set(orders[0])) == 3
    with pytest.raises(ValueError):
        comp.kl_greedy_order(engine, windows, 1, [0], scales, None, progress=False, phase="prefill")

    served = parse_method("adaskip+channel-affine+ret1024+served")
    assert served.served and served.selection == "kl-ret"
    assert (served.selection_phase("decode"), served.selection_phase("e2e")) == ("decode", "all")
    assert parse_method("adaskip+kl").selection_phase("decode") == "all"
    with pytest.raises(InputError):  # served changes a KL objective: the similarity ranking has none
        parse_method("adaskip+channel-affine+served")


def test_answers_first_ranks_by_probe_answers_then_kl(tiny_chat_model):
    """`em`: a probe's answer is wrong when the teacher-forced argmax misses a target token; the greedy takes the
    candidate with the fewest wrong answers, the KL sum only breaking ties (checked by brute force at K = 1)."""
    from adaskip.model import load_model
    from adaskip.runtime.torch_engine import TorchEngine

    model = load_model(str(tiny_chat_model))
    engine = TorchEngine.from_loaded(model)
    n = model.spec.num_sublayers
    scales = [0.9] * n
    probes = []
    for seed in range(4):
        ids = [(11 * i + 17 * seed) % 300 + 3 for i in range(40)]
        full = comp.probe_reference(engine, [comp.Probe(ids, list(range(30, 40)), prefix=30)])[0]
        probes.append(comp.Probe(ids, list(range(30, 40)), prefix=30, targets=full.argmax(-1).tolist()))
    scorer = comp.ProbeScorer(engine, probes)
    assert scorer.score([], scales, None) == (0, pytest.approx(0.0, abs=1e-6))  # the full model's own answers
    flipped = [comp.Probe(p.ids, p.positions, p.prefix, [(t + 1) % 300 for t in p.targets]) for p in probes[:2]]
    assert comp.ProbeScorer(engine, flipped + probes[2:]).score([], scales, None)[0] == 2
    assert comp.ProbeScorer(engine, [comp.Probe(p.ids, p.positions, p.prefix) for p in probes]).score(
        list(range(n)), scales, None)[0] == 0  # no targets: nothing to get wrong

    windows = [[(5 * i) % 300 + 3 for i in range(64)]]
    text = comp.WindowScorer(engine, windows, "decode")
    by_candidate = {}
    for j in range(n):
        wrong, kl = scorer.score([j], scales, None)
        by_candidate[j] = (wrong, kl + text.kl([j], scales, None))
    first = comp.kl_greedy_order(engine, windows, 1, list(range(n)), scales, None, progress=False, probes=probes,
                                 phase="decode", answers_first=True)
    assert first == [min(by_candidate, key=by_candidate.get)]
    assert comp.kl_greedy_order(engine, windows, 1, list(range(n)), scales, None, progress=False, probes=probes,
                                phase="decode") == [min(by_candidate, key=lambda j: by_candidate[j][1])]
    with pytest.raises(ValueError):
        comp.kl_greedy_order(engine, windows, 1, [0], scales, None, progress=False, answers_first=True)
    assert parse_method("adaskip+channel-affine+ret1024+served+em").answers_first
    with pytest.raises(InputError):
        parse_method("adaskip+channel-affine+kl+em")


def test_eval_records_of_another_probe_count_start_their_own_file():
    """--ret-probes changes the `ret` rows' plans but not their record keys: a non-default count must not resume the
    default's records (and the default keeps the digest earlier runs wrote)."""
    base = EvalOptions(model="m", out="o")
    assert base.digest("fp") == EvalOptions(model="m", out="o", ret_probes=base.ret_probes).digest("fp")
    assert EvalOptions(model="m", out="o", ret_probes=base.ret_probes + 3).digest("fp") != base.digest("fp")
