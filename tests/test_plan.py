"""SkipPlan: schema, round trip, model check, selection by K and alpha, the baselines' exact definitions."""

from __future__ import annotations

import json

import pytest

from adaskip import cost
from adaskip.errors import PlanError
from adaskip.model.spec import ModelSpec
from adaskip.plan import (Calibration, SkipPlan, adaskip_plan, baseline_layers, baseline_plan, rank_by_similarity,
                          skipdecode_layers_at)


def calib(sims, ratios=None) -> Calibration:
    return Calibration(similarity=list(sims), norm_ratio=list(ratios or [1.0 + j / 100 for j in range(len(sims))]),
                       num_prompts=2, prompt_tokens=16, data_digest="sha256:x", source="test")


SIMS = [0.5, 0.9, 0.97, 0.95, 0.99, 0.93, 0.96, 0.98]  # 4 layers


def test_adaskip_selects_most_similar_sublayers_and_beta_is_smallest_inside():
    plan = adaskip_plan(calib(SIMS), 3, "e2e", "fp")
    assert plan.skip == [4, 7, 2]
    assert plan.beta == pytest.approx(0.97)
    assert plan.scales == calib(SIMS).norm_ratio
    assert plan.online_enabled


def test_k0_plan_has_no_threshold_and_prefill_mode_no_online():
    assert adaskip_plan(calib(SIMS), 0, "decode", "fp").beta is None
    assert not adaskip_plan(calib(SIMS), 2, "prefill", "fp").online_enabled


@pytest.mark.parametrize("k", [-1, 9])
def test_out_of_range_k_is_refused(k):
    with pytest.raises(PlanError, match="between 0 and 8"):
        adaskip_plan(calib(SIMS), k, "e2e", "fp")


def test_round_trip_and_schema(tmp_path):
    plan = adaskip_plan(calib(SIMS), 2, "decode", "sha256:abc", "m")
    plan.save(tmp_path / "p.json")
    again = SkipPlan.load(tmp_path / "p.json")
    assert again.to_dict() == plan.to_dict() and again.digest() == plan.digest()
    d = plan.to_dict()
    d["skip"] = [1, 1]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match="skip"):
        SkipPlan.load(tmp_path / "bad.json")
    d = plan.to_dict()
    d["version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match="version 99"):
        SkipPlan.load(tmp_path / "v.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(PlanError, match="not readable JSON"):
        SkipPlan.load(tmp_path / "garbage.json")
    d = plan.to_dict()
    d["skip"] = [8]
    with pytest.raises(PlanError, match="outside"):
        SkipPlan.from_dict(d)


def test_plan_for_another_model_is_refused():
    plan = adaskip_plan(calib(SIMS), 2, "e2e", "sha256:aaa")
    plan.check_model("sha256:aaa", 4)
    with pytest.raises(PlanError, match="not this one"):
        plan.check_model("sha256:bbb", 4)
    with pytest.raises(PlanError, match="4-layer"):
        plan.check_model("sha256:aaa", 5)


def test_baselines_follow_the_reference_definitions():
    assert baseline_layers("early-exit", 32, 4) == [28, 29, 30, 31]
    assert baseline_layers("skipdecode", 32, 4) == [1, 2, 3, 4]
    assert baseline_layers("unified", 32, 6) == [1, 6, 11, 16, 21, 26, 31]  # 7 layers for k=6, as in the paper
    assert baseline_layers("unified", 32, 8) == [1, 5, 9, 13, 17, 21, 25, 29]
    assert baseline_layers("early-exit", 30, 0) == []
    with pytest.raises(PlanError):
        baseline_layers("unified", 30, 20)  # L // k == 1: the reference rule would skip nothing
    plan = baseline_plan("early-exit", 4, 1, "e2e", "fp")
    assert plan.skip == [6, 7] and plan.scales == [1.0] * 8 and not plan.online_enabled


def test_skipdecode_grows_with_the_step():
    # idx <= ceil(t / 512 * (k - 1)) + 1, capped at k, layer 0 kept; the reference's t is 0 at decode step 1
    assert skipdecode_layers_at(0, 32, 8) == [1]  # an e2e prefill: a fresh request's counter is 0 too
    assert skipdecode_layers_at(1, 32, 8) == [1]
    assert skipdecode_layers_at(2, 32, 8) == [1, 2]
    assert skipdecode_layers_at(74, 32, 8) == [1, 2]
    assert skipdecode_layers_at(75, 32, 8) == [1, 2, 3]
    assert skipdecode_layers_at(512, 32, 8) == list(range(1, 9))
    assert skipdecode_layers_at(5000, 32, 8) == list(range(1, 9))


SPEC = ModelSpec(family="llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=256, vocab_size=100, max_position_embeddings=4096, rope_theta=1e4, norm_eps=1e-5)


def test_cost_model_and_alpha_selection():
    flops, fixed = cost.sublayer_flops(SPEC, 1024, "prefill")
    assert len(flops) == 8 and all(f > 0 for f in flops)
    assert cost.ideal_speedup(SPEC, [], 1024, "decode") == 1.0
    ranking = rank_by_similarity(SIMS)
    k = cost.k_for_alpha(SPEC, ranking, 1.3, 1024, "prefill")
    assert cost.ideal_speedup(SPEC, ranking[:k], 1024, "prefill") >= 1.3
    assert cost.ideal_speedup(SPEC, ranking[:k - 1], 1024, "prefill") < 1.3
    with pytest.raises(PlanError, match="must be > 1"):
        cost.k_for_alpha(SPEC, ranking, 0.9, 1024, "prefill")
    with pytest.raises(PlanError, match="out of reach"):
        cost.k_for_alpha(SPEC, ranking, 1e12, 1024, "prefill")


def test_ideal_speedup_of_a_growing_set_averages_its_per_step_flop_fractions():
    from adaskip.layout import SkipLayout

    grows = SkipLayout.from_plan(baseline_plan("skipdecode", 4, 3, "decode", "fp"))
    costs, fixed = cost.sublayer_flops(SPEC, 1024, "decode")
    total = sum(costs) + fixed

    def fraction(layers: list[int]) -> float:
        return (total - sum(costs[j] for i in layers for j in (2 * i, 2 * i + 1))) / total

    # 300 decode steps: step 1 skips layer 1, steps 2..257 layers 1..2, steps 258..300 layers 1..3
    mean = (fraction([1]) + 256 * fraction([1, 2]) + 43 * fraction([1, 2, 3])) / 300
    e = cost.speedups(SPEC, grows, 1024, 300)
    assert e == {"context_len": 1024, "decode_steps": 300, "prefill": 1.0, "decode": round(1 / mean, 4)}
    grown = cost.ideal_speedup(SPEC, sorted(grows.offline), 1024, "decode")  # what the fully grown set gives
    assert e["decode"] < round(grown, 4)
    assert cost.speedups(SPEC, grows, 1024, 100_000)["decode"] == pytest.approx(grown, rel=5e-3)  # long run
    # e2e: the prefill skips layer 1 only, the decode steps grow as in decode mode
    e2e = cost.speedups(SPEC, SkipLayout.from_plan(baseline_plan("skipdecode", 4, 3, "e2e", "fp")), 1024, 300)
    assert e2e == {**e, "prefill": round(cost.ideal_speedup(SPEC, [2, 3], 1024, "prefill"), 4)}
    # a fixed set gives the same figure at any length
    fixed_set = SkipLayout.from_plan(baseline_plan("early-exit", 4, 2, "e2e", "fp"))
    assert cost.speedups(SPEC, fixed_set, 1024, 1) == {**cost.speedups(SPEC, fixed_set, 1024, 700), "decode_steps": 1}
    assert cost.speedups(SPEC, fixed_set, 1024, 1)["decode"] == round(cost.ideal_speedup(SPEC, [4, 5, 6, 7], 1024,
                                                                                          "decode"), 4)
    with pytest.raises(ValueError, match="at least 1"):
        cost.speedups(SPEC, fixed_set, 1024, 0)


def test_prefill_cost_counts_the_tail_for_one_token():
    """The engines run the sublayers after the last attention for the last token only (last_token_tail): the cost
    model counts them so, which makes skipping late attention worth more than its own FLOPs."""
    ctx, d, f, hd = 1024, SPEC.hidden_size, SPEC.intermediate_size, SPEC.head_dim
    proj = 2 * d * (SPEC.num_heads * hd * 2 + SPEC.num_kv_heads * hd * 2)
    ffn, head = 2 * 3 * d * f, 2 * d * SPEC.vocab_size
    core = 4 * SPEC.num_heads * hd * ctx * (ctx + 1) // 2
    assert cost.prefill_split(SPEC, ctx, []) == (head + 4 * ctx * proj + (3 * ctx + 1) * ffn, 4 * core)
    assert cost.prefill_split(SPEC, ctx, [], tail=False) == (head + 4 * ctx * (proj + ffn), 4 * core)  # other engines
    # attention of layers 2 and 3 skipped: layer 1's FFN onwards runs for one token
    assert cost.prefill_split(SPEC, ctx, [4, 6]) == (head + 2 * ctx * proj + (ctx + 3) * ffn, 2 * core)
    flops, fixed = cost.sublayer_flops(SPEC, ctx, "prefill")
    naive = (sum(flops) + fixed) / (sum(flops) + fixed - flops[4] - flops[6])
    assert cost.ideal_speedup(SPEC, [4, 6], ctx, "prefill") > naive
    assert cost.ideal_speedup(SPEC, [], ctx, "prefill") == 1.0


def test_malformed_plans_get_plan_errors_not_tracebacks():
    good = adaskip_plan(calib(SIMS), 2, "decode", "sha256:abc", "m").to_dict()
    cases = {
        "calibration missing key": lambda d: d["calibration"].pop("source"),
        "calibration extra key": lambda d: d["calibration"].update(extra=1),
        "null similarity": lambda d: d["calibration"]["similarity"].__setitem__(0, None),
        "short similarity": lambda d: d["calibration"]["similarity"].pop(),
        "budget vs skip": lambda d: d["budget"].update(k=3),
        "scales length": lambda d: d["scales"].pop(),
        "not an object": lambda d: d.update(online=[]),
    }
    for what, mutate in cases.items():
        d = json.loads(json.dumps(good))
        mutate(d)
        with pytest.raises(PlanError):
            SkipPlan.from_dict(d)
