"""Scales of an int8 KV cache (adaskip-build --kv-dtype int8), fitted on the build's calibration prompts.

ONNX Runtime's GroupQueryAttention stores a cached value x as round(x / scale) saturated to [-128, 127] and reads it
back as q * scale (`k_quant_type` / `v_quant_type` PER_CHANNEL: one scale per KV head and channel, [kv_heads, 1,
head_dim]); attention itself computes in float32. The scale of a channel is its largest magnitude over 127 on the
last calibration prompts (adaskip-verify's first window is the corpus start, the first calibration prompt's text),
each prefilled by the full model and with each skip set the plan runs (skipping changes what later layers see), so
nothing seen there saturates; larger values on other text are clipped.

K is cached after rotary: channels i and i + head_dim/2 are one rotating pair, so a key's value in either channel
depends on its position. Both channels get the scale of the pair's largest length sqrt(k_i^2 + k_{i+D/2}^2), which
no rotation changes: a key at a position the prompts never reached still fits. V is not rotated: per channel.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch

from adaskip.calibrate.corpus import CalibrationOptions, load_calibration
from adaskip.layout import SkipLayout

INT8_MAX = 127
MAX_PROMPTS = 4  # calibration prompts the scales are fitted on (a full-model prefill each on the reference engine)
_TINY = 1e-8  # a channel that is zero on every prompt gets a positive scale (and clips whatever it later holds)


def rotation_invariant_absmax(k: torch.Tensor) -> torch.Tensor:
    """k [..., T, D] (rotary over the full head, halves paired) -> [..., D]: per channel, the largest length of its
    rotating pair over the T positions (the same for both channels of a pair)."""
    half = k.shape[-1] // 2
    pair = torch.sqrt(k[..., :half].square() + k[..., half:].square()).amax(dim=-2)
    return torch.cat([pair, pair], dim=-1)


def fit_kv_scales(engine: Any, prompts: list[list[int]], skip_sets: Iterable[frozenset[int]] = (frozenset(),),
                  stand_in: Sequence[float] | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per layer, (k_scale, v_scale) float32 [kv_heads, 1, head_dim] from a prefill of each prompt on `engine` (the
    reference torch engine: its cache holds K after rotary and any per-head norm, as the kernel stores it) with each
    of `skip_sets` skipped (sublayer indices; skipped ones replaced by `stand_in`'s per-sublayer scales, 1 if None),
    the largest magnitudes over all of them."""
    if not prompts:
        raise ValueError("fitting KV scales needs at least one prompt")
    spec = engine.spec
    layers = list(range(spec.num_layers))
    n = spec.num_sublayers
    scales = torch.tensor([list(stand_in) if stand_in is not None else [1.0] * n], dtype=torch.float32)
    k_max: dict[int, torch.Tensor] = {}
    v_max: dict[int, torch.Tensor] = {}
    for skipped in dict.fromkeys(skip_sets):  # each distinct set once, in order
        skip = torch.zeros(1, n, dtype=torch.bool)
        skip[0, sorted(skipped)] = True
        for ids in prompts:
            cache = engine.new_cache(1, len(ids), layers)
            engine.prefill(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), cache, skip, scales,
                           want_stats=False)
            for i in layers:  # a skipped attention leaves its layer's cache at zero: no effect on the maxima
                k = rotation_invariant_absmax(cache.k[i][0].float())  # [kv_heads, D]
                v = cache.v[i][0].float().abs().amax(dim=-2)
                k_max[i] = k if i not in k_max else torch.maximum(k_max[i], k)
                v_max[i] = v if i not in v_max else torch.maximum(v_max[i], v)
    return {i: tuple((m.clamp_min(_TINY) / INT8_MAX)[:, None, :].numpy().astype(np.float32)
                     for m in (k_max[i], v_max[i])) for i in layers}


def fit_on_calibration(engine: Any, tokenizer: Any, cal: CalibrationOptions, layout: SkipLayout | None = None
                       ) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """The scales from the last calibration prompts (at most MAX_PROMPTS of `cal`), prefilled unskipped and with the
    offline sets `layout`'s plan skips in prefill and in decode, and the record of what they were fitted on (an
    engine's build info)."""
    data = load_calibration(tokenizer, cal.prompts, cal.tokens, cal.data)
    prompts = data.prompts[-MAX_PROMPTS:]
    skip_sets = [frozenset()]
    if layout is not None:  # online FFN skips are per request and not covered
        skip_sets += [layout.prefill_skip, layout.decode_skip_at(1)]
    scales = fit_kv_scales(engine, prompts, skip_sets, None if layout is None else layout.scales)
    record = {"prompts": len(prompts), "of": len(data.prompts), "tokens": cal.tokens, "source": data.source,
              "digest": data.digest, "skip_sets": [sorted(s) for s in dict.fromkeys(skip_sets)],
              "rule": "per KV head and channel: largest magnitude / 127 (K: of its rotary pair), over the last "
                      "calibration prompts and the plan's skip sets"}
    return scales, record
