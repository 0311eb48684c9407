"""A FLOP cost model of each sublayer at a context length: turns an acceleration target into a skip count K and
tells the ideal speedup a plan can give (what benchmarks compare against)."""

from __future__ import annotations

from adaskip.errors import PlanError
from adaskip.model.spec import ModelSpec


def _attention_span(window: int | None, context: int) -> int:
    return min(window, context) if window else context


def _attention_core(spec: ModelSpec, i: int, context_len: int, phase: str) -> int:
    """FLOPs of layer i's QK^T and AV products (2 * heads * head_dim each per query-key pair)."""
    span = _attention_span(spec.attention_windows[i], context_len)
    if phase == "prefill":  # causal: query t attends to min(t, span) keys
        pairs = span * (span + 1) // 2 + (context_len - span) * span
    elif phase == "decode":
        pairs = span
    else:
        raise ValueError(f"unknown phase {phase!r}")
    return 4 * spec.num_heads * spec.head_dim * pairs


def sublayer_flops(spec: ModelSpec, context_len: int, phase: str) -> tuple[list[float], float]:
    """(per-sublayer FLOPs, fixed FLOPs outside sublayers) for one prefill of `context_len` tokens or one decode
    step with `context_len` tokens of past."""
    d, hd = spec.hidden_size, spec.head_dim
    proj = 2 * d * (spec.num_heads * hd * 2 + spec.num_kv_heads * hd * 2)  # q, o + k, v per token
    ffn = 2 * 3 * d * spec.intermediate_size
    head = 2 * d * spec.vocab_size  # logits for the last position only
    tokens = context_len if phase == "prefill" else 1
    out: list[float] = []
    for i in range(spec.num_layers):
        out += [float(tokens * proj + _attention_core(spec, i, context_len, phase)), float(tokens * ffn)]
    return out, float(head)


def prefill_split(spec: ModelSpec, context_len: int, skipped: list[int]) -> tuple[float, float]:
    """(matrix-product FLOPs of the weights, attention QK^T/AV FLOPs) of one prefill with `skipped` sublayers
    removed: the two kinds run in different kernels at different speeds."""
    costs, fixed = sublayer_flops(spec, context_len, "prefill")
    removed = set(skipped)
    attention = sum(_attention_core(spec, i, context_len, "prefill") for i in range(spec.num_layers)
                    if 2 * i not in removed)
    total = sum(c for j, c in enumerate(costs) if j not in removed) + fixed
    return total - attention, float(attention)


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
