"""SkipLayout: what a plan means for every sublayer, computed once and read by every exporter, engine and tool.

A SkipPlan says which sublayers were chosen and why; the layout says what that implies for the shape of a forward,
for any request at any step (TensorRT-LLM's per-layer `layer_configs` play this part for its NAS models):

  * the offline set skipped in prefill (modes prefill/e2e) and in decode step t (SkipDecode in decode and e2e
    mode grows from layer 1, its e2e prefill skips layer 1 only);
  * the FFNs online learning may add during decode (modes decode/e2e, adaskip with online learning);
  * each sublayer's role: "never" (skipped in every forward: removable), "always" (runs in every forward: no
    conditional needed) or "dynamic" (depends on the phase, the step or online learning: needs a conditional);
  * the layers whose attention runs in some decode step (only they keep a KV cache);
  * where the prefill tail starts (last_token_tail), and the stand-ins of skipped sublayers (scales, compensation).

Per-request decisions (online learning) are SkipPolicy's; this module holds only what is fixed by the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from adaskip.errors import PlanError
from adaskip.plan import Compensation, SkipPlan, skipdecode_layers_at

ROLES = ("never", "always", "dynamic")


@dataclass(frozen=True)
class SkipLayout:
    plan: SkipPlan

    @classmethod
    def from_plan(cls, plan: SkipPlan) -> "SkipLayout":
        return cls(plan)

    # -- sizes and stand-ins -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.plan.num_layers

    @property
    def num_sublayers(self) -> int:
        return self.plan.num_sublayers

    @property
    def scales(self) -> tuple[float, ...]:
        """Per sublayer, the offline scale r_j of h' = r_j * h where it is skipped."""
        return tuple(self.plan.scales)

    @property
    def compensation(self) -> Compensation | None:
        """The per-channel stand-ins a backend applies to skipped offline sublayers (None: scalar scales only)."""
        return self.plan.compensation

    # -- which sublayers each phase skips offline ----------------------------------------------------------------
    @cached_property
    def offline(self) -> frozenset[int]:
        """The plan's offline skip set (what SkipDecode's decode set grows into)."""
        return frozenset(self.plan.skip)

    @cached_property
    def prefill_skip(self) -> frozenset[int]:
        """Skipped in every prefill forward: the offline set in modes prefill and e2e, nothing in decode mode.

        SkipDecode in e2e mode skips its step-0 set (layer 1 only): the reference's e2e variant meant a fresh
        request's counter, but resets it only after each prefill, so a prefill reads the previous request's final
        decode count (layer 1 for its first request, up to layers 1..k after a long generation), and the layers of
        that set that run again at decode step 1 then have no prefill K/V. A per-request counter (0 in prefill) is
        that rule without the carried-over state, and keeps every prefill set inside the decode sets after it.
        """
        if self.plan.mode == "decode":
            return frozenset()
        if self.grows_in_decode:
            return self._layers_at(0)
        return self.offline

    @property
    def grows_in_decode(self) -> bool:
        """SkipDecode in decode and e2e mode: the decode set grows with the step towards the offline set."""
        return self.plan.method == "skipdecode" and self.plan.mode in ("decode", "e2e")

    def decode_skip_at(self, step: int) -> frozenset[int]:
        """The offline set skipped at decode step `step` (1-based)."""
        if step < 1:
            raise ValueError(f"decode steps count from 1; got {step}")
        return self._layers_at(step) if self.grows_in_decode else self.offline

    def _layers_at(self, step: int) -> frozenset[int]:
        layers = skipdecode_layers_at(step, self.plan.num_layers, self.plan.k)
        return frozenset(j for i in layers for j in (2 * i, 2 * i + 1))

    # -- online learning -----------------------------------------------------------------------------------------
    @property
    def learns_online(self) -> bool:
        plan = self.plan
        return plan.online_enabled and plan.beta is not None and plan.mode in ("decode", "e2e")

    @cached_property
    def online_ffns(self) -> tuple[int, ...]:
        """FFN sublayers online learning may add in decode (every FFN outside the offline set, when it learns)."""
        if not self.learns_online:
            return ()
        return tuple(j for j in range(1, self.num_sublayers, 2) if j not in self.offline)

    # -- what the graph must contain -----------------------------------------------------------------------------
    @cached_property
    def roles(self) -> tuple[str, ...]:
        """Per sublayer, one of ROLES (see the module docstring)."""
        first_decode = self.decode_skip_at(1)
        online = set(self.online_ffns)
        roles = []
        for j in range(self.num_sublayers):
            if j in self.prefill_skip and j in first_decode:
                roles.append("never")
            elif j not in self.prefill_skip and j not in self.offline and j not in online:  # decode sets only grow
                roles.append("always")
            else:
                roles.append("dynamic")
        return tuple(roles)

    @cached_property
    def cached_layers(self) -> tuple[int, ...]:
        """Layers whose attention runs in some decode step: only they get a KV cache.

        Decode-phase skip sets only grow (SkipDecode) or stay fixed, so this is the complement of step 1's set.
        In `decode` mode prefill still computes the other layers' attention, but nothing needs their K/V after it.
        Every one of them must run its attention in prefill too (else its decode steps would read no K/V of the
        prompt): a plan whose prefill set is not inside step 1's set is refused.
        """
        skipped_at_1 = self.decode_skip_at(1)
        layers = tuple(i for i in range(self.num_layers) if 2 * i not in skipped_at_1)
        missing = [i for i in layers if 2 * i in self.prefill_skip]
        if missing:
            raise PlanError(f"layers {missing} would attend in decode without prefill K/V (their attention is "
                            f"skipped in prefill only)")
        return layers

    @property
    def has_conditional_cached_attention(self) -> bool:
        """A "dynamic" attention that keeps a KV cache (SkipDecode's growing set): its K/V would have to be written
        through a conditional branch."""
        return any(self.roles[2 * i] == "dynamic" for i in self.cached_layers)

    @cached_property
    def prefill_tail_start(self) -> int:
        """First sublayer of the prefill tail (last_token_tail) for every prefill this layout allows: after the last
        attention that is not removed outright (a "dynamic" one may run)."""
        return last_token_tail([i for i in range(self.num_layers) if self.roles[2 * i] != "never"])


def last_token_tail(attention_layers: list[int]) -> int:
    """The first sublayer from which a prefill needs only each row's last token, given the layers whose attention
    runs in it: the FFN right after the last of them (0 when none runs).

    Holds for a prefill that returns the last position's logits only and no similarity stats: every K/V the cache
    keeps is computed by then, and no attention after it reads the other tokens' rows, so those rows of every later
    sublayer feed nothing. AdaSkip tends to skip late attention, which lengthens this tail: its FFNs then run for one
    token instead of the whole prompt. Engines that honour it: the torch engine and the ORT graph variant.
    """
    return 2 * max(attention_layers) + 1 if attention_layers else 0
