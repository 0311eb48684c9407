"""A FLOP cost model of each sublayer at a context length: turns an acceleration target into a skip count K and
tells the ideal speedup a plan can give (what benchmarks compare against)."""

from __future__ import annotations

from adaskip.errors import PlanError
from adaskip.model.spec import ModelSpec
from adaskip.layout import SkipLayout, last_token_tail


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


def _per_token(spec: ModelSpec) -> tuple[float, float]:
    """Weight-product FLOPs per token of an attention sublayer (q, k, v, o) and of an FFN."""
    d, hd = spec.hidden_size, spec.head_dim
    return 2.0 * d * (spec.num_heads * hd * 2 + spec.num_kv_heads * hd * 2), 2.0 * 3 * d * spec.intermediate_size


def sublayer_flops(spec: ModelSpec, context_len: int, phase: str) -> tuple[list[float], float]:
    """(per-sublayer FLOPs, fixed FLOPs outside sublayers) for one prefill of `context_len` tokens (every token
    through every sublayer) or one decode step with `context_len` tokens of past."""
    proj, ffn = _per_token(spec)
    head = 2 * spec.hidden_size * spec.vocab_size  # logits for the last position only
    tokens = context_len if phase == "prefill" else 1
    out: list[float] = []
    for i in range(spec.num_layers):
        out += [float(tokens * proj + _attention_core(spec, i, context_len, phase)), float(tokens * ffn)]
    return out, float(head)


def prefill_split(spec: ModelSpec, context_len: int, skipped: list[int], tail: bool = True) -> tuple[float, float]:
    """(matrix-product FLOPs of the weights, attention QK^T/AV FLOPs) of one prefill with `skipped` sublayers
    removed, as our engines run it: the sublayers of the prefill tail (adaskip.layout.last_token_tail) for the last
    token only (tail=False: every token through every sublayer, as other engines run it). The two kinds run in
    different kernels at different speeds."""
    removed = set(skipped)
    proj, ffn = _per_token(spec)
    runs = [i for i in range(spec.num_layers) if 2 * i not in removed]
    tail_start = last_token_tail(runs) if tail else spec.num_sublayers
    matmul, attention = 2.0 * spec.hidden_size * spec.vocab_size, 0.0
    for j in range(spec.num_sublayers):
        if j in removed:
            continue
        tokens = 1 if j >= tail_start else context_len
        if j % 2 == 0:  # an attention that runs precedes the tail
            matmul += context_len * proj
            attention += _attention_core(spec, j // 2, context_len, "prefill")
        else:
            matmul += tokens * ffn
    return matmul, attention


def ideal_speedup(spec: ModelSpec, skipped: list[int], context_len: int, phase: str) -> float:
    """FLOPs of the unskipped model / FLOPs with `skipped` removed, in one prefill or one decode step."""
    if phase == "prefill":
        return sum(prefill_split(spec, context_len, [])) / sum(prefill_split(spec, context_len, skipped))
    costs, fixed = sublayer_flops(spec, context_len, phase)
    total = sum(costs) + fixed
    return total / (total - sum(costs[j] for j in set(skipped)))


def speedups(spec: ModelSpec, layout: SkipLayout, context_len: int, decode_steps: int) -> dict:
    """The ideal speedups of a plan over one generation at `context_len` tokens: its prefill, and its first
    `decode_steps` decode steps together (1 / the mean of their per-step FLOP fractions, each step costed at
    `context_len` tokens of past), with the sets the layout skips in each (SkipDecode's set grows with the step, so
    its figure depends on the length; every other plan's decode set is the same at every step). Online skipping is
    per request and not counted."""
    if decode_steps < 1:
        raise ValueError(f"decode_steps must be at least 1; got {decode_steps}")
    steps = [layout.decode_skip_at(t) for t in range(1, decode_steps + 1)]
    fraction = {s: 1.0 / ideal_speedup(spec, sorted(s), context_len, "decode") for s in set(steps)}
    total = sum(fraction[s] for s in steps)
    return {"context_len": context_len, "decode_steps": decode_steps,
            "prefill": round(ideal_speedup(spec, sorted(layout.prefill_skip), context_len, "prefill"), 4),
            "decode": round(decode_steps / total, 4)}


def k_for_alpha(spec: ModelSpec, ranking: list[int], alpha: float, context_len: int, phase: str) -> int:
    """Smallest K such that skipping the first K of `ranking` gives an ideal speedup >= alpha in `phase`."""
    if not alpha > 1.0:
        raise PlanError(f"--alpha is a target speedup and must be > 1 (e.g. 1.2); got {alpha}")
    for k in range(len(ranking) + 1):
        if ideal_speedup(spec, ranking[:k], context_len, phase) >= alpha:
            return k
    best = ideal_speedup(spec, ranking, context_len, phase)
    raise PlanError(f"--alpha {alpha} is out of reach: skipping every sublayer gives at most {best:.2f}x")
