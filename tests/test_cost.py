"""The bytes-and-FLOPs (roofline) ideal of adaskip/cost.py on a small model, against figures computed by hand."""

from __future__ import annotations

import pytest

from adaskip import cost
from adaskip.layout import SkipLayout
from adaskip.model.spec import ModelSpec
from adaskip.plan import baseline_plan

# 4 layers, hidden 64, 4 query heads and 2 KV heads of 16, FFN 256, vocabulary 100
SPEC = ModelSpec(family="llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=256, vocab_size=100, max_position_embeddings=4096, rope_theta=1e4, norm_eps=1e-5)
FLOPS_ONLY = cost.Machine(bandwidth_gbs=1e12, peak_gflops=1.0)  # memory free: the roofline is the FLOP model
BYTES_ONLY = cost.Machine(bandwidth_gbs=1.0, peak_gflops=1e12)  # compute free: the roofline is the bytes read

# one fp32 decode step over 1024 tokens of past, by hand
ATTN_W = 64 * (4 * 16 * 2 + 2 * 16 * 2) * 4  # q, k, v, o: 12288 weights
KV = 2 * 2 * 16 * (1024 + 1) * 4  # K and V of 2 heads: read over the 1024 past tokens, written for the new one
HIDDEN = 2 * 64 * 4 + 64 * 4  # the hidden state in and out, the norm's weight
ATTN = ATTN_W + KV + HIDDEN  # 312,320 bytes
FFN = 3 * 64 * 256 * 4 + HIDDEN  # 197,376 bytes
HEAD = 64 * 100 * 4 + 64 * 4 + 64 * 4  # LM head, the embedding row, the final norm: 26,112 bytes
STEP = 4 * (ATTN + FFN) + HEAD  # 2,064,896 bytes


def test_decode_bytes_by_hand():
    costs = cost.sublayer_costs(SPEC, 1024, "decode")
    assert [b for _, b in costs] == [ATTN, FFN] * 4 + [HEAD]
    assert [f for f, _ in costs] == pytest.approx(cost.sublayer_flops(SPEC, 1024, "decode")[0]
                                                  + [cost.sublayer_flops(SPEC, 1024, "decode")[1]])
    assert STEP == 2_064_896
    # 2 MB at 44.5 GB/s: every decode kernel is memory-bound on the default machine (0.5-0.92 FLOPs per byte)
    assert cost.roofline_seconds(costs) == pytest.approx(STEP / 44.5e9)
    # skipping attention 1 saves its weights and its KV cache, FFN 3 its weights
    assert cost.roofline_speedup(SPEC, [2, 7], 1024, "decode") == pytest.approx(STEP / (STEP - ATTN - FFN))
    assert cost.roofline_speedup(SPEC, [2, 7], 1024, "decode") == pytest.approx(2_064_896 / 1_555_200)
    # the KV cache grows with the context: a skipped attention is worth more at 4k than at 1k
    assert cost.roofline_speedup(SPEC, [2], 4000, "decode") > cost.roofline_speedup(SPEC, [2], 1024, "decode")
    # the memory floor's numerator: the step's bytes, less the skipped sublayers'; a layer's KV alone
    assert cost.decode_step_bytes(SPEC, 1024) == STEP
    assert cost.decode_step_bytes(SPEC, 1024, [2, 7]) == STEP - ATTN - FFN
    assert cost.kv_bytes(SPEC, 0, 1024, 1, 4.0) == KV and cost.kv_bytes(SPEC, 0, 1024, 1, 2.0) == KV / 2


def test_int4_and_half_widths_by_hand():
    q4 = cost.Widths.for_engine("float32", 4)
    assert q4 == cost.Widths(weights=0.625, head=0.625, kv=4.0, activations=4.0)  # 4 bits + an fp32 scale per 32
    assert cost.Widths.for_engine("float32", 8, "float16") == cost.Widths(1.125, 1.125, 2.0, 4.0)
    assert cost.Widths.for_engine("float16") == cost.Widths(2.0, 2.0, 2.0, 2.0)
    assert cost.Widths.for_engine("float32", 4, "int8") == cost.Widths(0.625, 0.625, 1.0, 4.0)  # an int8 KV cache
    attn, ffn = 12288 * 0.625 + KV + HIDDEN, 3 * 64 * 256 * 0.625 + HIDDEN
    costs = cost.sublayer_costs(SPEC, 1024, "decode", widths=q4)
    head = 64 * 100 * 0.625 + 64 * 4 + 64 * 4  # the head at 4 bits; the embedding row and final norm in fp32
    assert [b for _, b in costs] == [attn, ffn] * 4 + [head]
    step = 4 * (attn + ffn) + head
    # with int4 weights the KV cache is a larger share of a step: skipping an attention is worth more
    assert cost.roofline_speedup(SPEC, [2], 1024, "decode", q4) == pytest.approx(step / (step - attn))
    assert cost.roofline_speedup(SPEC, [2], 1024, "decode", q4) > cost.roofline_speedup(SPEC, [2], 1024, "decode")
    with pytest.raises(ValueError, match="no MatMulNBits width"):
        cost.Widths.for_engine("float32", 3)


def test_prefill_bytes_by_hand_and_its_tail():
    ctx = 64
    costs = cost.sublayer_costs(SPEC, ctx, "prefill", [4, 6])  # attention 2, 3 skipped: FFN 1 onwards, last token
    hidden = lambda tokens: 2 * tokens * 64 * 4 + 64 * 4  # noqa: E731
    attn = ATTN_W + 2 * 2 * 16 * (ctx + ctx) * 4 + hidden(ctx)
    ffn_w = 3 * 64 * 256 * 4
    head = 64 * 100 * 4 + ctx * 64 * 4 + 64 * 4
    assert [b for _, b in costs] == [attn, ffn_w + hidden(ctx), attn, ffn_w + hidden(1), ffn_w + hidden(1),
                                     ffn_w + hidden(1), head]
    # the FLOPs are the FLOP model's, tail included
    assert sum(f for f, _ in costs) == pytest.approx(sum(cost.prefill_split(SPEC, ctx, [4, 6])))
    assert sum(f for f, _ in cost.sublayer_costs(SPEC, ctx, "prefill", [4, 6], tail=False)) == pytest.approx(
        sum(cost.prefill_split(SPEC, ctx, [4, 6], tail=False)))
    with pytest.raises(ValueError, match="unknown phase"):
        cost.sublayer_costs(SPEC, ctx, "train")


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_roofline_reduces_to_flops_or_bytes_at_the_extremes(phase):
    skipped = [2, 5, 6]
    assert cost.roofline_speedup(SPEC, skipped, 1024, phase, machine=FLOPS_ONLY) == pytest.approx(
        cost.ideal_speedup(SPEC, skipped, 1024, phase))
    full, less = (sum(b for _, b in cost.sublayer_costs(SPEC, 1024, phase, s)) for s in ([], skipped))
    assert cost.roofline_speedup(SPEC, skipped, 1024, phase, machine=BYTES_ONLY) == pytest.approx(full / less)
    assert cost.roofline_speedup(SPEC, [], 1024, phase) == 1.0


def test_roofline_speedups_average_decode_steps_like_the_flop_ideal():
    """Same steps, same sets, same averaging as cost.speedups: with memory free the two agree, a growing set too."""
    for plan in (baseline_plan("skipdecode", 4, 3, "e2e", "fp"), baseline_plan("early-exit", 4, 2, "e2e", "fp")):
        layout = SkipLayout.from_plan(plan)
        flops = cost.speedups(SPEC, layout, 1024, 300)
        roof = cost.roofline_speedups(SPEC, layout, 1024, 300, machine=FLOPS_ONLY)
        assert {k: roof[k] for k in flops} == pytest.approx(flops, abs=2e-4)
        assert roof["machine"] == {"bandwidth_gbs": 1e12, "peak_gflops": 1.0} and roof["widths"]["weights"] == 4.0
    default = cost.roofline_speedups(SPEC, SkipLayout.from_plan(baseline_plan("early-exit", 4, 2, "e2e", "fp")),
                                     1024, 1)
    assert default["decode"] == round(STEP / (STEP - 2 * (ATTN + FFN)), 4)  # layers 2, 3 out
    with pytest.raises(ValueError, match="at least 1"):
        cost.roofline_speedups(SPEC, SkipLayout.from_plan(baseline_plan("early-exit", 4, 2, "e2e", "fp")), 1024, 0)
