"""SkipPolicy: masks per phase and mode, online decode learning, per-request state, batches, baselines."""

from __future__ import annotations

import math

import pytest
from test_plan import SIMS, calib

from adaskip.errors import PlanError
from adaskip.plan import adaskip_plan, baseline_plan
from adaskip.policy import SkipPolicy

N = 8
NAN = math.nan


def decode_stats(ffn_sims: dict[int, float], ratio: float = 0.9) -> tuple[list[float], list[float]]:
    s = [0.1] * N
    r = [1.0] * N
    for j, v in ffn_sims.items():
        s[j], r[j] = v, ratio
    return s, r


def run_window(policy, state, ffn_sims, steps=None, ratio=0.9):
    for _ in range(steps or policy.plan.window):
        mask = policy.decode_mask(state)
        s, r = decode_stats(ffn_sims, ratio)
        s = [NAN if mask.skip[j] else v for j, v in enumerate(s)]
        policy.observe_decode(state, s, r)


def test_modes_decide_which_phases_skip():
    for mode, prefill_skips in (("prefill", True), ("decode", False), ("e2e", True)):
        policy = SkipPolicy(adaskip_plan(calib(SIMS), 2, mode, "fp"))
        st = policy.new_request()
        assert policy.prefill_mask(st).skipped == ([4, 7] if prefill_skips else [])
        assert policy.decode_mask(st).skipped == [4, 7]
        assert policy.decode_mask(st).scales[4] == calib(SIMS).norm_ratio[4]


def test_online_turns_on_exactly_the_ffns_at_or_above_beta_after_w_steps():
    plan = adaskip_plan(calib(SIMS), 2, "e2e", "fp", window=5)  # offline {4 (attn2), 7 (ffn3)}, beta = 0.98
    policy = SkipPolicy(plan)
    st = policy.new_request()
    # ffn0 at beta exactly, ffn1 above, ffn2 just below; attention similarities are ignored
    sims = {1: 0.98, 3: 0.995, 5: 0.9799, 0: 0.999}
    run_window(policy, st, sims, steps=4)
    assert policy.decode_mask(st).skipped == [4, 7]  # nothing online before W steps
    run_window(policy, st, sims, steps=1)
    mask = policy.decode_mask(st)
    assert mask.skipped == [1, 3, 4, 7]
    assert mask.scales[1] == 0.9 and mask.scales[3] == 0.9  # decode-mean norm ratio
    assert set(st.online) == {1, 3}
    # decisions are final after the window: later stats change nothing
    run_window(policy, st, {1: 0.0, 3: 0.0, 5: 1.0}, steps=10)
    assert policy.decode_mask(st).skipped == [1, 3, 4, 7]


def test_online_uses_the_window_mean_not_the_last_value():
    policy = SkipPolicy(adaskip_plan(calib(SIMS), 2, "decode", "fp", window=4))  # beta 0.98
    st = policy.new_request()
    for v in (0.99, 0.99, 0.99, 0.9):  # mean 0.9675 < beta although three steps are above
        s, r = decode_stats({1: v})
        policy.observe_decode(st, s, r)
    assert st.online == {}
    assert abs(policy.window_means(st)[1] - 0.9675) < 1e-12


def test_reference_bug_a_threshold_survives_later_requests():
    """The reference resets beta to 1.0 at every prefill, so online skipping never fires again."""
    policy = SkipPolicy(adaskip_plan(calib(SIMS), 2, "e2e", "fp", window=3))
    for request in range(3):
        st = policy.new_request()
        policy.prefill_mask(st)
        run_window(policy, st, {1: 0.99})
        assert st.online.keys() == {1}, f"request {request}"
        assert policy.plan.beta == 0.98


def test_reference_bug_b_online_set_does_not_leak_into_the_next_request():
    """The reference clears a request's extra FFNs only after the next request's prefill has used them."""
    policy = SkipPolicy(adaskip_plan(calib(SIMS), 2, "e2e", "fp", window=3))
    first = policy.new_request()
    run_window(policy, first, {1: 0.99})
    assert 1 in first.online
    second = policy.new_request()
    assert policy.prefill_mask(second).skipped == [4, 7]
    assert policy.decode_mask(second).skipped == [4, 7]
    run_window(policy, second, {1: 0.5}, steps=3)
    assert policy.decode_mask(second).skipped == [4, 7]


def test_k0_works_and_never_skips():
    policy = SkipPolicy(adaskip_plan(calib(SIMS), 0, "e2e", "fp", window=2))
    st = policy.new_request()
    assert policy.prefill_mask(st).skipped == []
    run_window(policy, st, {1: 1.0, 3: 1.0})
    assert policy.decode_mask(st).skipped == []
    assert list(policy.layout.cached_layers) == [0, 1, 2, 3]


def test_layer0_attention_skip_has_no_cache_and_no_crash():
    sims = [0.999] + SIMS[1:]
    policy = SkipPolicy(adaskip_plan(calib(sims), 1, "e2e", "fp"))
    assert policy.plan.skip == [0]
    assert list(policy.layout.cached_layers) == [1, 2, 3]


def test_batch_rows_learn_independently():
    policy = SkipPolicy(adaskip_plan(calib(SIMS), 2, "e2e", "fp", window=3))
    rows = [policy.new_request(), policy.new_request()]
    for _ in range(3):
        for st, sims in zip(rows, ({1: 0.99}, {5: 0.99})):
            s, r = decode_stats(sims)
            policy.observe_decode(st, s, r)
    a, b = (policy.decode_mask(st) for st in rows)
    assert a.skipped == [1, 4, 7] and b.skipped == [4, 5, 7]
    # attention decisions agree across rows (offline only), which the engine relies on
    assert [a.skip[j] for j in range(0, N, 2)] == [b.skip[j] for j in range(0, N, 2)]


def test_baselines_have_no_online_step_and_skipdecode_grows_in_decode_and_e2e_mode():
    policy = SkipPolicy(baseline_plan("early-exit", 4, 1, "e2e", "fp"))
    st = policy.new_request()
    run_window(policy, st, {1: 1.0, 3: 1.0})
    assert policy.decode_mask(st).skipped == [6, 7]
    sd = SkipPolicy(baseline_plan("skipdecode", 32, 8, "decode", "fp"))
    st = sd.new_request()
    assert sd.prefill_mask(st).skipped == []
    assert sd.decode_mask(st).skipped == [2, 3]  # step 1: layer 1
    assert list(sd.layout.cached_layers) == [0] + list(range(2, 32))
    for _ in range(511):
        sd.observe_decode(st, [NAN] * 64, [NAN] * 64)
    assert sd.decode_mask(st).skipped == list(range(2, 18))  # step 512: layers 1..8


def test_skipdecode_e2e_skips_layer_1_in_prefill_and_grows_in_decode_step_by_step():
    """k = 3 on 5 layers: idx <= ceil((t - 1) / 512 * 2) + 1 at decode step t, capped at 3; the prefill reads the
    request's own counter, 0 (the reference's e2e variant reads the previous request's instead)."""
    e2e = SkipPolicy(baseline_plan("skipdecode", 5, 3, "e2e", "fp"))
    layers = {1: [2, 3], 2: [2, 3, 4, 5], 3: [2, 3, 4, 5, 6, 7]}  # layer -> sublayers of layers 1..n
    for request in range(2):  # a second request starts again from layer 1: no state carried over
        st = e2e.new_request()
        assert e2e.prefill_mask(st).skipped == layers[1]
        seen = []
        for step in range(1, 600):
            seen.append(e2e.decode_mask(st).skipped)
            e2e.observe_decode(st, [NAN] * 10, [NAN] * 10)
        assert seen[0] == layers[1]  # step 1: the counter is 0
        assert seen[1] == seen[256] == layers[2]  # steps 2..257: ceil((t - 1) / 256) = 1
        assert seen[257] == seen[598] == layers[3]  # from step 258 on: capped at k = 3
        assert all(set(a) <= set(b) for a, b in zip(seen, seen[1:]))  # only grows
    # layer 1 is skipped in every forward; layers 2, 3 attend in prefill (K/V) and in early decode steps
    assert list(e2e.layout.roles) == ["always", "always", "never", "never"] + ["dynamic"] * 4 + ["always"] * 2
    assert e2e.layout.cached_layers == (0, 2, 3, 4) and e2e.layout.has_conditional_cached_attention
    # k = 1: a single layer, skipped in every forward as before
    one = SkipPolicy(baseline_plan("skipdecode", 5, 1, "e2e", "fp")).layout
    assert one.prefill_skip == one.decode_skip_at(1) == one.decode_skip_at(999) == frozenset({2, 3})
    assert not one.has_conditional_cached_attention
    # prefill mode keeps the reference's fixed layers 1..k in every forward
    pre = SkipPolicy(baseline_plan("skipdecode", 5, 3, "prefill", "fp")).layout
    assert pre.prefill_skip == pre.decode_skip_at(1) == frozenset(range(2, 8))


def test_a_layout_refuses_decode_attention_without_prefill_kv():
    from adaskip.layout import SkipLayout

    class Stale(SkipLayout):  # the reference's e2e rule after a long request: layers 1..k in prefill, 1 at step 1
        @property
        def prefill_skip(self) -> frozenset[int]:
            return self.offline

    with pytest.raises(PlanError, match=r"layers \[2, 3\] would attend in decode without prefill K/V"):
        Stale(baseline_plan("skipdecode", 5, 3, "e2e", "fp")).cached_layers


def test_sublayer_roles_tell_an_exporter_what_can_be_baked_in():
    e2e = SkipPolicy(adaskip_plan(calib(SIMS), 2, "e2e", "fp"))  # offline {4, 7}, online on FFNs 1, 3, 5
    assert list(e2e.layout.roles) == ["always", "dynamic", "always", "dynamic", "never", "dynamic", "always", "never"]
    dec = SkipPolicy(adaskip_plan(calib(SIMS), 2, "decode", "fp"))  # prefill runs all
    assert list(dec.layout.roles) == ["always", "dynamic", "always", "dynamic", "dynamic", "dynamic", "always",
                                    "dynamic"]
    static = SkipPolicy(adaskip_plan(calib(SIMS), 2, "prefill", "fp"))  # no online step
    assert list(static.layout.roles) == ["always"] * 4 + ["never", "always", "always", "never"]
    sd = SkipPolicy(baseline_plan("skipdecode", 4, 3, "decode", "fp"))  # grows over layers 1..3 in decode
    assert list(sd.layout.roles) == ["always", "always"] + ["dynamic"] * 6


def test_prefill_tail_starts_after_the_last_attention_that_can_run():
    from adaskip.layout import last_token_tail

    assert last_token_tail([0, 1, 2, 3]) == 7  # only the last FFN
    assert last_token_tail([0, 2]) == 5  # layer 2's FFN and everything of layer 3
    assert last_token_tail([]) == 0  # no attention at all: every sublayer is row-wise
    e2e = SkipPolicy(baseline_plan("early-exit", 4, 2, "e2e", "fp"))  # layers 2, 3 removed outright
    assert e2e.layout.prefill_tail_start == 3
    # decode mode: prefill runs every attention (the offline ones are "dynamic"), so the tail is the last FFN
    assert SkipPolicy(baseline_plan("early-exit", 4, 2, "decode", "fp")).layout.prefill_tail_start == 7
    assert SkipPolicy(baseline_plan("early-exit", 4, 4, "e2e", "fp")).layout.prefill_tail_start == 0
