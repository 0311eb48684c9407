"""Cost models of each sublayer at a context length: turn an acceleration target into a skip count K and tell the
ideal speedup a plan can give (what benchmarks compare against).

Two ideals. The FLOP ideal (`ideal_speedup`, `speedups`): the fraction of the FLOPs a plan removes. The bytes-and-FLOPs
ideal (`roofline_speedup`, `roofline_speedups`): every sublayer takes max(bytes it reads / memory bandwidth, its FLOPs
/ compute peak) on a stated machine (a per-kernel roofline), the step the sum over the sublayers that run. A decode
step is memory-bound (a matrix-vector product does 2 FLOPs per weight it reads, attention over the cache 2 * heads /
kv_heads per cached element), so there the ideal is the fraction of the bytes removed: a skipped attention saves its
weights and its layer's KV cache, an FFN its weights, and the LM head, which every step reads in full, is paid by all.
A prefill's products over the whole prompt are compute-bound, so there it comes to the FLOP fraction. One rule for
both phases is what makes "fraction of ideal" mean the same in each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

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


def _over_generation(layout: SkipLayout, decode_steps: int, step_speedup: Callable[[list[int]], float]) -> float:
    """1 / the mean over decode steps 1..decode_steps of each step's cost fraction (1 / `step_speedup(skipped)`)."""
    if decode_steps < 1:
        raise ValueError(f"decode_steps must be at least 1; got {decode_steps}")
    steps = [layout.decode_skip_at(t) for t in range(1, decode_steps + 1)]
    fraction = {s: 1.0 / step_speedup(sorted(s)) for s in set(steps)}
    return decode_steps / sum(fraction[s] for s in steps)


def speedups(spec: ModelSpec, layout: SkipLayout, context_len: int, decode_steps: int) -> dict:
    """The ideal speedups of a plan over one generation at `context_len` tokens: its prefill, and its first
    `decode_steps` decode steps together (1 / the mean of their per-step FLOP fractions, each step costed at
    `context_len` tokens of past), with the sets the layout skips in each (SkipDecode's set grows with the step, so
    its figure depends on the length; every other plan's decode set is the same at every step). Online skipping is
    per request and not counted."""
    decode = _over_generation(layout, decode_steps, lambda s: ideal_speedup(spec, s, context_len, "decode"))
    return {"context_len": context_len, "decode_steps": decode_steps,
            "prefill": round(ideal_speedup(spec, sorted(layout.prefill_skip), context_len, "prefill"), 4),
            "decode": round(decode, 4)}


def k_for_alpha(spec: ModelSpec, ranking: list[int], alpha: float, context_len: int, phase: str) -> int:
    """Smallest K such that skipping the first K of `ranking` gives an ideal speedup >= alpha in `phase`."""
    if not alpha > 1.0:
        raise PlanError(f"--alpha is a target speedup and must be > 1 (e.g. 1.2); got {alpha}")
    for k in range(len(ranking) + 1):
        if ideal_speedup(spec, ranking[:k], context_len, phase) >= alpha:
            return k
    best = ideal_speedup(spec, ranking, context_len, phase)
    every = "every sublayer" if len(ranking) == spec.num_sublayers else f"all {len(ranking)} ranked sublayers"
    raise PlanError(f"--alpha {alpha} is out of reach: skipping {every} gives at most {best:.2f}x")


# -- the bytes-and-FLOPs (roofline) ideal ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Machine:
    """The two rates of the roofline. The default is the 2-core machine the benchmarks in docs/ run on: 44.5 GB/s of
    memory read bandwidth and 210 GFLOP/s, the fp32 MatMul rate adaskip-bench measures there in ONNX Runtime at 2
    threads (its "Kernels alone" line). Only their ratio (4.7 FLOPs per byte) decides which side bounds a kernel:
    decode kernels do 0.5-1.5 FLOPs per byte in fp32 and prompt-wide products hundreds, far from it either way."""
    bandwidth_gbs: float = 44.5
    peak_gflops: float = 210.0


MACHINE = Machine()


@dataclass(frozen=True)
class Widths:
    """Bytes an engine reads per element: of the sublayers' weight matrices, of the LM head, of the KV cache, and of
    the activations, norm weights and embedding rows (the embedding table stays in the model dtype when the head is
    quantized)."""
    weights: float = 4.0
    head: float = 4.0
    kv: float = 4.0
    activations: float = 4.0

    @classmethod
    def for_engine(cls, dtype: str = "float32", bits: int | None = None, kv_dtype: str | None = None,
                   block_size: int = 32) -> "Widths":
        """An engine's widths from adaskip-build's --dtype, --quantize (as its bit count: int4 = 4, int8 = 8) and
        --kv-dtype: weight-only MatMulNBits (symmetric) stores `bits` per weight plus one fp32 scale per block of
        `block_size` for the sublayers' linear layers and the LM head, and keeps the activations in the model dtype
        (adaskip/export/onnx/quantize.py); the KV cache is in `kv_dtype`, the model dtype by default."""
        width = _DTYPE_BYTES[dtype]
        kv = _DTYPE_BYTES[kv_dtype or dtype]
        if bits is None:
            return cls(width, width, kv, width)
        if bits not in (4, 8):
            raise ValueError(f"no MatMulNBits width for {bits}-bit weights")
        packed = bits / 8 + 4.0 / block_size
        return cls(packed, packed, kv, width)


# int8 is a KV cache type only; its scales are per channel, not per token, so nothing is added per element
_DTYPE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0}


def sublayer_costs(spec: ModelSpec, context_len: int, phase: str, skipped: Iterable[int] = (), tail: bool = True,
                   widths: Widths = Widths()) -> list[tuple[float, float]]:
    """(FLOPs, bytes read or written) of every sublayer that runs, then of the fixed part (embedding row, final norm,
    LM head for the last position), in one prefill of `context_len` tokens (the prefill tail for the last token only,
    as in prefill_split) or one decode step with `context_len` tokens of past.

    Bytes: each weight matrix and norm weight read once; an attention writes its new K/V and reads its cached K/V
    once over its span (a decode step: the whole span; a prefill: the prompt's, once, as a fused kernel streams it);
    each sublayer reads and writes the hidden state of the tokens it runs for (activations inside a sublayer are
    taken to stay in cache). Skipped sublayers cost nothing: a skipped attention's layer keeps no KV cache."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"unknown phase {phase!r}")
    removed = set(skipped)
    d, hd = spec.hidden_size, spec.head_dim
    proj, ffn = _per_token(spec)
    attn_weights = d * (spec.num_heads * hd * 2 + spec.num_kv_heads * hd * 2)
    ffn_weights = 3 * d * spec.intermediate_size
    runs = [i for i in range(spec.num_layers) if 2 * i not in removed]
    tail_start = last_token_tail(runs) if (tail and phase == "prefill") else spec.num_sublayers
    prompt = context_len if phase == "prefill" else 1
    out: list[tuple[float, float]] = []
    for j in range(spec.num_sublayers):
        if j in removed:
            continue
        tokens = 1 if j >= tail_start else prompt
        hidden = 2.0 * tokens * d * widths.activations + d * widths.activations  # in, out; its norm's weight
        if j % 2 == 0:
            kv = kv_bytes(spec, j // 2, context_len, prompt, widths.kv)
            out.append((float(prompt * proj + _attention_core(spec, j // 2, context_len, phase)),
                        attn_weights * widths.weights + kv + hidden))
        else:
            out.append((float(tokens * ffn), ffn_weights * widths.weights + hidden))
    head = d * spec.vocab_size * widths.head + prompt * d * widths.activations + d * widths.activations
    out.append((2.0 * d * spec.vocab_size, float(head)))
    return out


def kv_bytes(spec: ModelSpec, layer: int, context_len: int, new_tokens: int, width: float) -> float:
    """Bytes of layer `layer`'s KV cache a forward of `new_tokens` tokens reads (over its attention span) and writes
    (the new tokens' K and V), `width` bytes per element."""
    span = _attention_span(spec.attention_windows[layer], context_len)
    return 2.0 * spec.num_kv_heads * spec.head_dim * (span + new_tokens) * width


def decode_step_bytes(spec: ModelSpec, context_len: int, skipped: Iterable[int] = (),
                      widths: Widths = Widths()) -> float:
    """Bytes one decode step with `context_len` tokens of past moves to and from memory with `skipped` removed: the
    numerator of its memory floor (that over the machine's read bandwidth is the fastest the step can be)."""
    return sum(b for _, b in sublayer_costs(spec, context_len, "decode", skipped, widths=widths))


def roofline_seconds(costs: list[tuple[float, float]], machine: Machine = MACHINE) -> float:
    """Seconds the kernels take if each runs at the roofline: max(bytes / bandwidth, FLOPs / peak), summed."""
    return sum(max(b / (machine.bandwidth_gbs * 1e9), f / (machine.peak_gflops * 1e9)) for f, b in costs)


def roofline_speedup(spec: ModelSpec, skipped: list[int], context_len: int, phase: str, widths: Widths = Widths(),
                     machine: Machine = MACHINE, tail: bool = True) -> float:
    """Roofline time of the unskipped model / with `skipped` removed, in one prefill or one decode step."""
    full = roofline_seconds(sublayer_costs(spec, context_len, phase, [], tail, widths), machine)
    return full / roofline_seconds(sublayer_costs(spec, context_len, phase, skipped, tail, widths), machine)


def roofline_speedups(spec: ModelSpec, layout: SkipLayout, context_len: int, decode_steps: int,
                      widths: Widths = Widths(), machine: Machine = MACHINE) -> dict:
    """The bytes-and-FLOPs ideal of a plan over one generation, as `speedups` gives the FLOP ideal (the same decode
    steps and sets), with the machine and widths it assumes."""
    decode = _over_generation(layout, decode_steps,
                              lambda s: roofline_speedup(spec, s, context_len, "decode", widths, machine))
    prefill = roofline_speedup(spec, sorted(layout.prefill_skip), context_len, "prefill", widths, machine)
    return {"context_len": context_len, "decode_steps": decode_steps, "prefill": round(prefill, 4),
            "decode": round(decode, 4), "machine": asdict(machine), "widths": asdict(widths)}
