"""SkipPolicy: the single implementation of "which sublayers run at this step" (offline set + online learning).

What is fixed by the plan (the offline sets per phase, roles, cached layers, online-eligible FFNs) is the plan's
SkipLayout (adaskip/layout.py); this module adds the per-request part.

Pure Python, no tensors; every backend asks it through the Generator and none re-implements the rule.

Per request, step by step:
  * prefill forward: skip the offline set in modes `prefill` and `e2e`, nothing in `decode` (SkipDecode in `e2e`
    mode: layer 1 only, its set at step 0);
  * decode step t (1-based): skip the offline set (SkipDecode in `decode` and `e2e` mode: its set at step t), plus,
    once the first W steps are done, the request's online FFNs;
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

from adaskip.layout import SkipLayout
from adaskip.plan import SkipPlan


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
    """Per-request skip decisions on top of a plan's SkipLayout (which holds everything fixed by the plan)."""

    def __init__(self, plan: SkipPlan, layout: SkipLayout | None = None):
        self.plan = plan
        self.layout = layout or SkipLayout.from_plan(plan)
        self.n = plan.num_sublayers

    def new_request(self) -> RequestState:
        return RequestState()

    @property
    def learns_online(self) -> bool:
        return self.layout.learns_online

    # -- which sublayers are skipped -------------------------------------------------------------------------------
    def prefill_mask(self, state: RequestState) -> Mask:
        return self._mask(self.layout.prefill_skip, {})

    def decode_mask(self, state: RequestState) -> Mask:
        """The mask of the decode step about to run (step state.decode_steps + 1)."""
        return self._mask(self.layout.decode_skip_at(state.decode_steps + 1), state.online)

    def _mask(self, offline: frozenset[int], online: dict[int, float]) -> Mask:
        scales = list(self.layout.scales)
        for j, r in online.items():
            scales[j] = r
        skip = tuple(j in offline or j in online for j in range(self.n))
        return Mask(skip=skip, scales=tuple(scales))

    def fixed_decode_mask(self, state: RequestState, steps: int) -> bool:
        """Whether the next `steps` decode steps of this request get one and the same mask whatever they observe:
        no online decision falls between them (the window is done, or still open after the last of them) and the
        offline set does not grow between them."""
        first, last = state.decode_steps + 1, state.decode_steps + steps
        learning = self.learns_online and not state.learned and last > self.plan.window
        return not learning and self.layout.decode_skip_at(first) == self.layout.decode_skip_at(last)

    def wants_decode_stats(self, state: RequestState) -> bool:
        """Whether the next decode step's similarity stats will be used (only while the window is open)."""
        return self.learns_online and not state.learned

    # -- online learning -------------------------------------------------------------------------------------------
    def observe_decode(self, state: RequestState, similarity: list[float], norm_ratio: list[float]) -> None:
        """Record one finished decode step's stats (NaN = sublayer did not run)."""
        state.decode_steps += 1
        if not self.learns_online or state.learned:
            return
        for j in self.layout.online_ffns:  # FFNs only: attention decisions are offline only
            s, r = similarity[j], norm_ratio[j]
            if math.isnan(s):
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
