"""The step loop: the only code that turns SkipPolicy decisions into engine calls and engine statistics back into
policy observations.

Every driver goes through it: the Generator (sampling, streaming), adaskip-verify (an engine against the reference,
in lockstep), the eval runner (teacher forcing), and the serving scheduler. A driver owns the rows of a batch and
the KV cache; per forward the stepper asks the policy for each row's mask, runs the engine once for all rows, and
(for a decode step) feeds each row's similarity statistics back to the policy, which learns its online FFN skips.

Rows carry their own RequestState, so a row can join or leave between steps without touching the others; `slot` is
the row's place in the KV cache. `prefill`/`decode` run every slot of the cache in one forward, so `rows[b].slot
== b` there; engines that treat their cache as a pool of slots (`supports_slots`: the `ort` variant) also take a
prompt chunk into one slot (`prefill_chunk`) and a decode step over any subset of slots (`decode_slots`), which is
what the serving scheduler (adaskip/runtime/scheduler.py) drives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from adaskip.errors import InputError
from adaskip.policy import Mask, RequestState, SkipPolicy
from adaskip.runtime.engine import Engine, KVCacheLike, StepOutput


@dataclass
class Row:
    """One request's place in a running batch: its KV slot and its policy state."""

    slot: int
    state: RequestState = field(default_factory=RequestState)
    mask: Mask | None = None  # the mask of the row's last forward

    @property
    def decode_steps(self) -> int:
        return self.state.decode_steps


def stack_masks(masks: list[Mask]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row masks -> the engine's skip [B, 2L] and scale [B, 2L] tensors."""
    # through numpy: a third of torch.tensor's cost on nested lists, which every decode step pays
    return (torch.from_numpy(np.array([m.skip for m in masks], dtype=bool)),
            torch.from_numpy(np.array([m.scales for m in masks], dtype=np.float32)))


class Stepper:
    def __init__(self, engine: Engine, policy: SkipPolicy):
        self.engine = engine
        self.policy = policy

    def new_rows(self, count: int) -> list[Row]:
        return [Row(slot=b, state=self.policy.new_request()) for b in range(count)]

    def new_cache(self, batch: int, capacity: int) -> KVCacheLike:
        """A KV cache of `batch` slots x `capacity` positions for the layers the plan keeps a cache for."""
        return self.engine.new_cache(batch, capacity, list(self.policy.layout.cached_layers))

    def _masks(self, rows: list[Row], decode: bool, any_slot: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        for b, row in enumerate(rows):
            if row.slot != b and not any_slot:
                raise InputError(f"row {b} sits in slot {row.slot}: these engines run every slot of the cache")
            row.mask = self.policy.decode_mask(row.state) if decode else self.policy.prefill_mask(row.state)
        return stack_masks([row.mask for row in rows])

    def prefill(self, rows: list[Row], ids: torch.Tensor, valid: torch.Tensor, cache: KVCacheLike,
                want_stats: bool = False, all_logits: bool = False) -> StepOutput:
        """Each row's prompt (ids/valid [B, T], left-padded) under its prefill mask. Online learning is decode-only,
        so nothing is observed; stats come back only when asked for (verification, calibration)."""
        skip, scales = self._masks(rows, decode=False)
        return self.engine.prefill(ids, valid, cache, skip, scales, all_logits=all_logits, want_stats=want_stats)

    def decode(self, rows: list[Row], tokens: torch.Tensor, cache: KVCacheLike) -> StepOutput:
        """One decode step for every row (tokens [B]); each row's policy state observes its statistics."""
        skip, scales = self._masks(rows, decode=True)
        want = any(self.policy.wants_decode_stats(row.state) for row in rows)
        return self._observe(rows, self.engine.decode(tokens, cache, skip, scales, want_stats=want))

    # -- rows in any slots of a pool (engines with supports_slots) -------------------------------------------------
    def _slot_engine(self) -> Any:
        if not getattr(self.engine, "supports_slots", False):
            raise InputError(f"{type(self.engine).__name__} runs whole batches only; serving rows in their own KV "
                             "slots needs the `ort` graph variant (OrtGqaEngine)")
        return self.engine

    def prefill_chunk(self, row: Row, ids: list[int], pool: KVCacheLike) -> StepOutput:
        """The next chunk of one row's prompt into its slot, under its prefill mask; logits of the chunk's last
        token (the first generated token's, once the last chunk is in)."""
        engine = self._slot_engine()
        skip, scales = self._masks([row], decode=False, any_slot=True)
        return engine.prefill_slot(row.slot, torch.tensor(ids, dtype=torch.long), pool, skip, scales)

    def decode_slots(self, rows: list[Row], tokens: torch.Tensor, pool: KVCacheLike) -> StepOutput:
        """One decode step for rows in any slots of a pool (their attention decisions must agree: see
        `attention_key`); outputs in `rows` order; each row's policy state observes its statistics."""
        engine = self._slot_engine()
        skip, scales = self._masks(rows, decode=True, any_slot=True)
        want = any(self.policy.wants_decode_stats(row.state) for row in rows)
        return self._observe(rows, engine.decode_slots([r.slot for r in rows], tokens, pool, skip, scales,
                                                       want_stats=want))

    def attention_key(self, row: Row) -> tuple[int, ...]:
        """The attention sublayers the row's next decode step skips: rows with equal keys can share a forward
        (attention decisions agree across a forward's rows; FFN decisions may differ per row)."""
        skip = self.policy.decode_mask(row.state).skip
        return tuple(j for j in range(0, len(skip), 2) if skip[j])

    def _observe(self, rows: list[Row], out: StepOutput) -> StepOutput:
        sims, ratios = out.similarity.tolist(), out.norm_ratio.tolist()
        for b, row in enumerate(rows):
            self.policy.observe_decode(row.state, sims[b], ratios[b])
        return out

    def teacher_force(self, row: Row, tokens: list[int], cache: KVCacheLike) -> torch.Tensor:
        """Next-token logits [len(tokens), vocab] after feeding known `tokens` one decode step each (one row).

        When the masks of those steps cannot change (no online decision and no growing set within them) and the
        engine returns every position's logits, the tokens go in as one chunk: the same logits in one forward. The
        chunk records no per-step statistics, so a row forced that way ends its request there (as the eval's does).
        """
        if not tokens:
            return torch.empty(0, self.engine.spec.vocab_size)
        policy, state = self.policy, row.state
        if getattr(self.engine, "supports_all_logits", False) and \
                policy.fixed_decode_mask(state, len(tokens)):
            skip, scales = self._masks([row], decode=True)
            ids = torch.tensor([tokens])
            out = self.engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), cache, skip, scales,
                                      all_logits=True, want_stats=False)
            state.decode_steps += len(tokens)  # as if observed step by step (nothing is learned in between)
            return out.logits[0]
        logits = []
        for tok in tokens:
            logits.append(self.decode([row], torch.tensor([tok]), cache).logits[0])
        return torch.stack(logits)
