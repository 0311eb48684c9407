"""A FLOP cost model of each sublayer at a context length: turns an acceleration target into a skip count K and
tells the ideal speedup a plan can give (what benchmarks compare against)."""

from __future__ import annotations

from adaskip.errors import PlanError
from adaskip.model.spec import ModelSpec


def _attention_span(window: int | None, context: int) -> int:
    return min(window, context) if window else context


def sublayer_flops(spec: ModelSpec, context_len: int, phase: str) -> tuple[list[float], float]:
    """(per-sublayer FLOPs, fixed FLOPs outside sublayers) for one prefill of `context_len` tokens or one decode
    step with `context_len` tokens of past."""
    d, hd = spec.hidden_size, spec.head_dim
    proj = 2 * d * (spec.num_heads * hd * 2 + spec.num_kv_heads * hd * 2)  # q, o + k, v per token
    ffn = 2 * 3 * d * spec.intermediate_size
    head = 2 * d * spec.vocab_size  # logits for the last position only
    out: list[float] = []
    for i in range(spec.num_layers):
        span = _attention_span(spec.attention_windows[i], context_len)
        if phase == "prefill":
            # causal: query t attends to min(t, span) keys; QK^T and AV each 2 * heads * hd per pair
            pairs = span * (span + 1) // 2 + (context_len - span) * span  # sum over t of min(t, span)
            attn = context_len * proj + 4 * spec.num_heads * hd * pairs
            out += [float(attn), float(context_len * ffn)]
        elif phase == "decode":
            out += [float(proj + 4 * spec.num_heads * hd * span), float(ffn)]
        else:
            raise ValueError(f"unknown phase {phase!r}")
    return out, float(head)


def ideal_speedup(spec: ModelSpec, skipped: list[int], context_len: int, phase: str) -> float:
    costs, fixed = sublayer_flops(spec, context_len, phase)
    total = sum(costs) + fixed
    return total / (total - sum(costs[j] for j in set(skipped)))


def speedups(spec: ModelSpec, prefill_skipped: list[int], decode_skipped: list[int], context_len: int) -> dict:
    return {"context_len": context_len,
            "prefill": round(ideal_speedup(spec, prefill_skipped, context_len, "prefill"), 4),
            "decode": round(ideal_speedup(spec, decode_skipped, context_len, "decode"), 4)}


def k_for_alpha(spec: ModelSpec, ranking: list[int], alpha: float, context_len: int, phase: str) -> int:
    """Smallest K such that skipping the first K of `ranking` gives an ideal speedup >= alpha in `phase`."""
    if not alpha > 1.0:
        raise PlanError(f"--alpha is a target speedup and must be > 1 (e.g. 1.2); got {alpha}")
    for k in range(len(ranking) + 1):
        if ideal_speedup(spec, ranking[:k], context_len, phase) >= alpha:
            return k
    best = ideal_speedup(spec, ranking, context_len, phase)
    raise PlanError(f"--alpha {alpha} is out of reach: skipping every sublayer gives at most {best:.2f}x")
