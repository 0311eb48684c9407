"""The reference engine: a decoder-only transformer written directly from a ModelSpec (gpt-fast style).

It is the parity oracle for every other backend and the engine that calibration runs on. Skipping is real: a
skipped sublayer reads none of its weights, and a layer whose attention is skipped for the whole request has no
KV cache at all.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from adaskip.engine_dir import WEIGHTS, EngineDir
from adaskip.errors import EngineDirError, InputError
from adaskip.model.rope import apply_rope, inv_frequencies, rope_cos_sin, uses_local_rope
from adaskip.model.spec import LoadedModel, ModelSpec, fingerprint
from adaskip.plan import Compensation
from adaskip.layout import last_token_tail
from adaskip.runtime.engine import StepOutput
from adaskip.similarity import io_similarity


class KVCache:
    """Preallocated K/V for the layers in `cached_layers` only; `valid` marks real (non-padding) slots."""

    def __init__(self, spec: ModelSpec, batch: int, capacity: int, cached_layers: list[int], dtype: torch.dtype):
        shape = (batch, spec.num_kv_heads, capacity, spec.head_dim)
        live = set(cached_layers)
        self.k = [torch.zeros(shape, dtype=dtype) if i in live else None for i in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) if i in live else None for i in range(spec.num_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool)
        self.next_pos = torch.zeros(batch, dtype=torch.long)
        self.capacity = capacity
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v if t is not None)

    @property
    def cached_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.k) if t is not None]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


# the gated FFN's activation by ModelSpec.activation
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class TorchEngine:
    """Engine protocol implementation in plain PyTorch (CPU or CUDA)."""

    supports_all_logits = True  # prefill can return every position's logits (teacher forcing in one forward)

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], compensation: Compensation | None = None):
        self.spec = spec
        self.w = weights
        self.dtype = weights["embed"].dtype
        self.inv_freq = inv_frequencies(spec)
        self.inv_freq_local = inv_frequencies(spec, local=True)  # sliding-window layers' RoPE (if it differs)
        self.act = ACTIVATIONS[spec.activation]
        self.lm_head = weights.get("lm_head", weights["embed"])
        # the plan's per-channel stand-ins for skipped sublayers (Compensation: the rule), as [D] tensors
        self.compensation = {j: (torch.tensor(a, dtype=self.dtype), torch.tensor(b, dtype=self.dtype))
                             for j, (a, b) in (compensation.sublayers.items() if compensation else ())}
        # called as observer(j, h, h_out, valid) for every sublayer that ran (calibration fits read the stream)
        self.observer: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None

    @classmethod
    def from_loaded(cls, model: LoadedModel, compensation: Compensation | None = None) -> "TorchEngine":
        return cls(model.spec, model.weights, compensation)

    @classmethod
    def from_engine_dir(cls, ed: EngineDir, threads: int | None = None) -> "TorchEngine":
        """The torch backend's engine dir: weights refused unless they hash to the plan's model fingerprint."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            weights = load_file(str(ed.root / WEIGHTS))
        except (SafetensorError, OSError) as e:
            raise EngineDirError(f"{ed.root}/{WEIGHTS} is corrupt: {e}") from None
        if fingerprint(ed.spec, weights) != ed.fingerprint:
            raise EngineDirError(f"{ed.root}: weights do not match the model fingerprint in the manifest (corrupt or "
                                 f"replaced); rebuild the engine")
        return cls(ed.spec, weights, ed.plan.compensation)

    # -- Engine protocol ---------------------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int, cached_layers: list[int]) -> KVCache:
        return KVCache(self.spec, batch, capacity, cached_layers, self.dtype)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, cache: KVCache, skip: torch.Tensor,
                scales: torch.Tensor, all_logits: bool = False, want_stats: bool = True) -> StepOutput:
        positions = cache.next_pos[:, None] + (valid.long().cumsum(-1) - 1).clamp_min(0)
        return self._forward(ids, valid.bool(), positions, cache, skip, scales, all_logits, want_stats)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cache: KVCache, skip: torch.Tensor, scales: torch.Tensor,
               want_stats: bool = True) -> StepOutput:
        ids = tokens.reshape(-1, 1)
        valid = torch.ones_like(ids, dtype=torch.bool)
        return self._forward(ids, valid, cache.next_pos[:, None].clone(), cache, skip, scales, False, want_stats)

    @torch.inference_mode()
    def teacher_forced_logits(self, ids: list[int], skip: list[int], scales: list[float],
                              logits_at: list[int] | None = None,
                              resume: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
        """One prompt's next-token logits [N, V] at the positions `logits_at` (default: every position), with the
        sublayers in `skip` skipped and no KV cache kept: the selection rules' scoring forward. Only the scored rows
        go through the LM head (a 262k-word head over a 2k prompt costs more than the layers). `resume` = (j, h):
        start at sublayer j from its input h [1, T, D], which must be the one this forward would compute there
        (a full-model run's, when nothing before j is skipped: `sublayer_inputs`)."""
        n = self.spec.num_sublayers
        if resume is not None and any(s < resume[0] for s in skip):
            raise ValueError(f"cannot resume at sublayer {resume[0]}: sublayers {sorted(skip)} skip one before it")
        mask = torch.zeros(1, n, dtype=torch.bool)
        mask[0, list(skip)] = True
        x = torch.tensor([ids])
        valid = torch.ones_like(x, dtype=torch.bool)
        cache = self.new_cache(1, len(ids), cached_layers=[])
        out = self._forward(x, valid, torch.arange(len(ids))[None], cache, mask, torch.tensor([scales]), True, False,
                            logits_at=logits_at, resume=resume)
        return out.logits[0]

    @torch.inference_mode()
    def sublayer_inputs(self, ids: list[int], sublayers: list[int],
                        logits_at: list[int] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One full-model forward over a prompt: its logits at `logits_at` (default: every position), as
        teacher_forced_logits gives them, and its input [1, T, D] to each sublayer in `sublayers` (to resume from)."""
        keep: dict[int, torch.Tensor] = {}
        wanted = set(sublayers)

        def observe(j: int, h: torch.Tensor, out: torch.Tensor, valid: torch.Tensor) -> None:
            if j in wanted:
                keep[j] = h.clone()

        previous, self.observer = self.observer, observe
        try:
            logits = self.teacher_forced_logits(ids, [], [1.0] * self.spec.num_sublayers, logits_at=logits_at)
        finally:
            self.observer = previous
        return logits, keep

    # -- the model ---------------------------------------------------------------------------------------------
    def _forward(self, ids, valid, positions, cache: KVCache, skip, scales, all_logits, want_stats,
                 logits_at: list[int] | None = None, resume: tuple[int, torch.Tensor] | None = None) -> StepOutput:
        spec = self.spec
        batch, seq = ids.shape
        start = cache.length
        if start + seq > cache.capacity:
            raise InputError(f"KV cache holds {cache.capacity} positions; {start + seq} requested")
        cache.valid[:, start:start + seq] = valid
        masks: dict[int | None, torch.Tensor | None] = {}
        ropes = {False: rope_cos_sin(self.inv_freq, positions)}  # uses_local_rope -> (cos, sin)
        if any(uses_local_rope(spec, i) for i in range(spec.num_layers)):
            ropes[True] = rope_cos_sin(self.inv_freq_local, positions)
        skip = skip.bool()
        scales = scales.to(self.dtype)
        sims = torch.full((batch, spec.num_sublayers), math.nan)
        ratios = torch.full((batch, spec.num_sublayers), math.nan)

        # a prefill for the last logits alone computes the tail for the last token only (an observer reads every row)
        tail = None
        if seq > 1 and not (want_stats or all_logits) and self.observer is None:
            tail = last_token_tail([i for i in range(spec.num_layers) if not skip[:, 2 * i].all()])

        first = 0 if resume is None else resume[0]
        if resume is None:
            h = F.embedding(ids, self.w["embed"])
            if spec.embed_scale != 1.0:  # scaled in the model dtype, as Gemma does
                h = h * torch.tensor(spec.embed_scale, dtype=self.dtype)
        for i in range(first // 2, spec.num_layers):
            window = spec.attention_windows[i]
            if window not in masks:
                masks[window] = self._mask(cache.valid[:, :start + seq], start, seq, window)
            for j, block in ((2 * i, "attention"), (2 * i + 1, "ffn")):
                if j < first:  # resumed after this sublayer
                    continue
                if j == first and resume is not None:
                    h = resume[1]
                if j == tail:  # left padding: every row's last token is the last column
                    h = h[:, -1:]
                run = ~skip[:, j]
                if not run.any():
                    h = self._skipped(h, j, scales)  # no weights read
                    continue
                if block == "attention":
                    if not run.all():
                        raise ValueError(f"attention of layer {i} must be skipped for all rows of a batch or none")
                    out = h + self._attention(i, h, *ropes[uses_local_rope(spec, i)], cache, start, masks[window])
                elif run.all():
                    out = h + self._ffn(i, h)
                else:  # per-request online decisions: compute the FFN only for the rows that run it
                    out = self._skipped(h, j, scales)
                    out[run] = h[run] + self._ffn(i, h[run])
                if want_stats:
                    sims[run, j], ratios[run, j] = io_similarity(h[run], out[run], valid[run])
                if self.observer is not None:
                    self.observer(j, h[run], out[run], valid[run])
                h = out

        cache.length += seq
        cache.next_pos += valid.long().sum(-1)
        h = h[:, logits_at] if logits_at is not None else h if all_logits else h[:, -1]
        h = rms_norm(h, self.w["final_norm"], spec.norm_eps)
        return StepOutput(logits=F.linear(h, self.lm_head).float(), similarity=sims, norm_ratio=ratios)

    def _skipped(self, h: torch.Tensor, j: int, scales: torch.Tensor) -> torch.Tensor:
        """A skipped sublayer's output: per-channel scale * h + shift where the plan has a compensation for it,
        else the per-row scalar (the paper's norm ratio, or an online FFN's decode ratio)."""
        if j in self.compensation:
            scale, shift = self.compensation[j]
            return h * scale + shift
        return h * scales[:, j, None, None]

    @staticmethod
    def _mask(keys_valid: torch.Tensor, start: int, seq: int, window: int | None) -> torch.Tensor | None:
        """[B, 1, T, S] bool: causal, padding and sliding window; each query always sees itself (no empty rows).

        None when plain causal attention is exact (no padding, no window in reach, a fresh or one-token step):
        SDPA then takes its fused causal kernel instead of materializing a T x S mask.
        """
        keys = keys_valid.shape[1]
        if bool(keys_valid.all()) and (window is None or window >= keys) and (start == 0 or seq == 1):
            return None
        q = torch.arange(start, start + seq)[:, None]
        k = torch.arange(keys_valid.shape[1])[None, :]
        allowed = k <= q
        if window is not None:
            allowed = allowed & (k > q - window)
        mask = allowed[None] & keys_valid[:, None, :]
        return (mask | (k == q)[None])[:, None]

    def _linear(self, x: torch.Tensor, i: int, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"layers.{i}.{name}"], self.w.get(f"layers.{i}.{name}_bias"))

    def _attention(self, i: int, h, cos, sin, cache: KVCache, start: int, mask) -> torch.Tensor:
        spec = self.spec
        batch, seq, _ = h.shape
        x = rms_norm(h, self.w[f"layers.{i}.attn_norm"], spec.norm_eps)
        q = self._linear(x, i, "q").view(batch, seq, spec.num_heads, spec.head_dim).transpose(1, 2)
        k = self._linear(x, i, "k").view(batch, seq, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        v = self._linear(x, i, "v").view(batch, seq, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        if spec.qk_norm:  # per head, before RoPE
            q = rms_norm(q, self.w[f"layers.{i}.q_norm"], spec.norm_eps)
            k = rms_norm(k, self.w[f"layers.{i}.k_norm"], spec.norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache.k[i] is not None:
            cache.k[i][:, :, start:start + seq] = k
            cache.v[i][:, :, start:start + seq] = v
            k, v = cache.k[i][:, :, :start + seq], cache.v[i][:, :, :start + seq]
        elif start > 0:
            raise RuntimeError(f"attention of layer {i} has no KV cache but was asked to run after prefill "
                               f"(the policy declared it skipped for this request)")
        elif mask is not None:
            mask = mask[..., :seq]
        causal = mask is None and seq > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=spec.attn_scale,
                                             enable_gqa=spec.num_heads != spec.num_kv_heads)
        out = self._linear(out.transpose(1, 2).reshape(batch, seq, -1), i, "o")
        return self._post_norm(out, i, "attn_post_norm")

    def _ffn(self, i: int, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, self.w[f"layers.{i}.ffn_norm"], self.spec.norm_eps)
        out = self._linear(self.act(self._linear(x, i, "gate")) * self._linear(x, i, "up"), i, "down")
        return self._post_norm(out, i, "ffn_post_norm")

    def _post_norm(self, out: torch.Tensor, i: int, role: str) -> torch.Tensor:
        """Sandwich norm of a block's output (spec.post_norms), inside the sublayer: h' = h + post_norm(block)."""
        return rms_norm(out, self.w[f"layers.{i}.{role}"], self.spec.norm_eps) if self.spec.post_norms else out
