"""SkipPolicy: the single implementation of "which sublayers run at this step" (offline set + online learning).

Pure Python, no tensors; every backend asks it through the Generator and none re-implements the rule.

Per request, step by step:
  * prefill forward: skip the offline set in modes `prefill` and `e2e`, nothing in `decode`;
  * decode step t (1-based): skip the offline set (SkipDecode in `decode` mode: its set at step t), plus, once the
    first W steps are done, the request's online FFNs;
  * online learning (modes decode/e2e, adaskip only): during decode steps 1..W record IO similarity and norm ratio
    of every FFN that ran; after step W, each FFN outside the offline set whose mean similarity >= beta joins the
    request's skip set with its mean norm ratio as scale.
State lives in a RequestState per request and is never shared: a new request starts from the plan alone
(the reference code's carried-over threshold and extra-FFN list are the bugs this layout rules out).
In a batch every row has its own RequestState; attention decisions are offline only, so they agree across rows,
and a row's online FFNs apply to that row alone (the engine computes an FFN only for the rows that run it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from adaskip.plan import Compensation, SkipPlan, skipdecode_layers_at


@dataclass
class RequestState:
    decode_steps: int = 0  # decode forwards completed
    sim_sum: dict[int, float] = field(default_factory=dict)  # FFN j -> sum of decode similarities in the window
    ratio_sum: dict[int, float] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)
    online: dict[int, float] = field(default_factory=dict)  # FFN j -> scale, decided after the window
    learned: bool = False


@dataclass(frozen=True)
class Mask:
    skip: tuple[bool, ...]  # per sublayer
    scales: tuple[float, ...]  # per sublayer, used where skip is True

    @property
    def skipped(self) -> list[int]:
        return [j for j, s in enumerate(self.skip) if s]


class SkipPolicy:
    def __init__(self, plan: SkipPlan):
        self.plan = plan
        self.n = plan.num_sublayers
        self.offline = frozenset(plan.skip)
        self._growing = plan.method == "skipdecode" and plan.mode == "decode"

    def new_request(self) -> RequestState:
        return RequestState()

    @property
    def compensation(self) -> Compensation | None:
        """The per-channel stand-ins a backend applies to skipped offline sublayers (None: scalar scales only)."""
        return self.plan.compensation

    @property
    def learns_online(self) -> bool:
        return self.plan.online_enabled and self.plan.beta is not None and self.plan.mode in ("decode", "e2e")

    # -- which sublayers are skipped -------------------------------------------------------------------------------
    def prefill_mask(self, state: RequestState) -> Mask:
        skipped = self.offline if self.plan.mode in ("prefill", "e2e") else frozenset()
        return self._mask(skipped, {})

    def decode_mask(self, state: RequestState) -> Mask:
        """The mask of the decode step about to run (step state.decode_steps + 1)."""
        return self._mask(self._decode_offline(state.decode_steps + 1), state.online)

    def _decode_offline(self, step: int) -> frozenset[int]:
        if self._growing:
            layers = skipdecode_layers_at(step, self.plan.num_layers, self.plan.k)
            return frozenset(j for i in layers for j in (2 * i, 2 * i + 1))
        return self.offline

    def _mask(self, offline: frozenset[int], online: dict[int, float]) -> Mask:
        scales = list(self.plan.scales)
        for j, r in online.items():
            scales[j] = r
        skip = tuple(j in offline or j in online for j in range(self.n))
        return Mask(skip=skip, scales=tuple(scales))

    def cached_layers(self) -> list[int]:
        """Layers whose attention runs in some decode step: only they get a KV cache.

        Decode-phase skip sets only grow (SkipDecode) or stay fixed, so this is the complement of step 1's set.
        In `decode` mode prefill still computes the other layers' attention, but nothing needs their K/V after it.
        """
        skipped_at_1 = self._decode_offline(1)
        return [i for i in range(self.plan.num_layers) if 2 * i not in skipped_at_1]

    def sublayer_roles(self) -> list[str]:
        """Per sublayer, what any forward of any request may do with it (what an exporter bakes into a graph):
        "never" (skipped in every forward: removable), "always" (runs in every forward: no conditional needed),
        or "dynamic" (depends on the phase, the step or online learning: needs a conditional)."""
        roles = []
        prefill = set(self.prefill_mask(self.new_request()).skipped)
        ever_in_decode = self.offline  # the decode-phase set only grows towards the full offline set
        first_decode = self._decode_offline(1)
        for j in range(self.n):
            online = self.learns_online and j % 2 == 1 and j not in self.offline
            if j in prefill and j in first_decode:
                roles.append("never")
            elif j not in prefill and j not in ever_in_decode and not online:
                roles.append("always")
            else:
                roles.append("dynamic")
        return roles

    def prefill_tail_start(self) -> int:
        """First sublayer of the prefill tail (last_token_tail) for every prefill this policy can ask for: after the
        last attention that is not removed outright (a "dynamic" one may run)."""
        roles = self.sublayer_roles()
        return last_token_tail([i for i in range(self.plan.num_layers) if roles[2 * i] != "never"])

    def wants_decode_stats(self, state: RequestState) -> bool:
        """Whether the next decode step's similarity stats will be used (only while the window is open)."""
        return self.learns_online and not state.learned

    # -- online learning -------------------------------------------------------------------------------------------
    def observe_decode(self, state: RequestState, similarity: list[float], norm_ratio: list[float]) -> None:
        """Record one finished decode step's stats (NaN = sublayer did not run)."""
        state.decode_steps += 1
        if not self.learns_online or state.learned:
            return
        for j in range(1, self.n, 2):  # FFNs only: attention decisions are offline only
            s, r = similarity[j], norm_ratio[j]
            if j in self.offline or math.isnan(s):
                continue
            state.sim_sum[j] = state.sim_sum.get(j, 0.0) + s
            state.ratio_sum[j] = state.ratio_sum.get(j, 0.0) + r
            state.count[j] = state.count.get(j, 0) + 1
        if state.decode_steps >= self.plan.window:
            beta = self.plan.beta
            state.online = {j: state.ratio_sum[j] / state.count[j] for j in sorted(state.count)
                            if state.sim_sum[j] / state.count[j] >= beta}
            state.learned = True

    def window_means(self, state: RequestState) -> dict[int, float]:
        """FFN j -> mean decode similarity recorded so far (for reporting and tests)."""
        return {j: state.sim_sum[j] / state.count[j] for j in state.count}


def last_token_tail(attention_layers: list[int]) -> int:
    """The first sublayer from which a prefill needs only each row's last token, given the layers whose attention
    runs in it: the FFN right after the last of them (0 when none runs).

    Holds for a prefill that returns the last position's logits only and no similarity stats: every K/V the cache
    keeps is computed by then, and no attention after it reads the other tokens' rows, so those rows of every later
    sublayer feed nothing. AdaSkip tends to skip late attention, which lengthens this tail: its FFNs then run for one
    token instead of the whole prompt. Engines that honour it: the torch engine and the ORT graph variant.
    """
    return 2 * max(attention_layers) + 1 if attention_layers else 0
