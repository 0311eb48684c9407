"""A quality budget: the largest skip set whose next-token KL from the full model on held-out text stays under a
bound (adaskip-build --max-kl).

KL(full || skipped) per position, in nats, measured where the plan's mode skips (compensation.WindowScorer): for
prefill and e2e mode at every position of the held-out windows with the offline set skipped in every forward, for
decode mode on each window's second half teacher-forced through skipped decode steps after an unskipped first half
(its prompt is never skipped); each skipped sublayer replaced by the plan's stand-in. K grows along the selection's
ranking; the answer is the largest K such that every K' <= K stays under the bound (the scan stops at the first K
over it, so a later dip below the bound is not taken: a user raising the bound never gets a smaller set). Online FFN
skipping during decode is decided per request and is not covered by the bound.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from adaskip.calibrate import compensation as comp
from adaskip.errors import InputError
from adaskip.plan import Compensation
from adaskip.runtime.torch_engine import TorchEngine

HELDOUT_WINDOWS = 4  # held-out windows the bound is measured on
HELDOUT_TOKENS = 512  # tokens per window (at most the calibration prompts' length)
MEASURES = {  # what the bound measures, by compensation.PHASES (recorded in the plan's selection)
    "all": "mean next-token KL(full || skipped), nats, every position, offline set skipped in every forward",
    "decode": "mean next-token KL(full || skipped), nats, each window's second half through skipped decode steps "
              "after its first half on the full model (decode mode's prompt is never skipped)",
}


@dataclass
class KlBudget:
    k: int  # sublayers the bound allows
    kl: float  # held-out KL at k (0 at k = 0)
    bound: float
    trace: list[float] = field(default_factory=list)  # held-out KL at K = 1, 2, ... as far as the scan went

    def record(self) -> dict[str, Any]:
        return {"max_kl": self.bound, "heldout_kl": self.kl, "kl_by_k": [round(v, 6) for v in self.trace]}


def check_bound(bound: float, flag: str = "--max-kl") -> None:
    if not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
        raise InputError(f"{flag} is a next-token KL bound in nats and must be a finite number > 0 (e.g. 0.1); "
                         f"got {bound}")


def largest_within_kl(engine: TorchEngine, windows: list[list[int]], ranking: list[int], scales: list[float],
                      compensation: Compensation | None, bound: float, progress: bool = True,
                      phase: str = "all") -> KlBudget:
    """Skip ranking[:K] for K = 1, 2, ...: the largest K whose held-out mean KL (and every smaller K's) is <= bound,
    measured in `phase` (compensation.PHASES)."""
    check_bound(bound)
    scorer = comp.WindowScorer(engine, windows, phase)
    trace: list[float] = []
    bar = tqdm(total=len(ranking), desc="max-kl scan", unit="K", disable=not progress, file=sys.stderr)
    try:
        for k in range(1, len(ranking) + 1):
            kl = scorer.kl(ranking[:k], scales, compensation)
            trace.append(kl)
            bar.update(1)
            if kl > bound:
                break
    finally:
        bar.close()
    k = next((i for i, v in enumerate(trace) if v > bound), len(trace))
    return KlBudget(k=k, kl=trace[k - 1] if k else 0.0, bound=bound, trace=trace)
