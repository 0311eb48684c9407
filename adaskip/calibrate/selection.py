"""Which sublayers to skip, beyond the paper's similarity ranking: the greedy KL order and its retrieval-aware form.

One recipe for adaskip-build (`--select kl|retrieval`) and adaskip-eval (`adaskip+kl`, `+ret`, `+em`): the greedy
tries the `candidates` most IO-similar sublayers and adds, one at a time, the one whose skip (with the plan's
stand-in) moves the full model's next-token distribution least (compensation.kl_greedy_order) on

* the first `windows` calibration prompts, cut to `window_tokens` tokens (plain text), and
* with `probes` > 0, synthetic retrieval prompts of `probe_tokens` tokens (passkey, multikey, kv in turn) from seeds
  no evaluation uses, scored at their answers' positions; `answers_first` compares candidates by how many of those
  answers they get wrong before the KL (what lifted Gemma-3-270M's retrieval above Early Exit's at matched
  speed in docs/quality-paired-em*.md).

Where a skip is scored follows the plan's mode (compensation.PHASES): a decode-mode plan's skips on decode steps
after an unskipped prompt, every other mode's in every forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from adaskip.calibrate import compensation as comp
from adaskip.calibrate import tasks
from adaskip.errors import InputError
from adaskip.plan import Compensation, rank_by_similarity
from adaskip.runtime.torch_engine import TorchEngine

SELECTIONS = ("similarity", "kl", "retrieval")  # adaskip-build --select


@dataclass(frozen=True)
class GreedyRecipe:
    """Everything the greedy order depends on besides the model, its calibration and the stand-in. The build's
    defaults are the settings the evaluated retrieval-aware plans were chosen with (docs/quality-paired-em*.md)."""

    candidates: int = 12  # the most IO-similar sublayers the greedy tries (at least K of them)
    windows: int = 1  # calibration prompts whose plain-text KL is scored
    window_tokens: int = 256  # ... their first tokens
    probes: int = 0  # synthetic retrieval prompts (0: plain-text KL only)
    probe_tokens: int = 1024  # tokens per probe
    answers_first: bool = False  # rank by the probes' wrong answers first, then by the KL
    seed: int = 0  # the probes' seed (offset by tasks.PROBE_SEED_OFFSET from the evaluation's)

    @classmethod
    def for_select(cls, select: str, candidates: int, probes: int, probe_tokens: int) -> GreedyRecipe:
        """adaskip-build's --select kl / retrieval (retrieval: answers first, the objective that won)."""
        if select == "kl":
            return cls(candidates=candidates)
        if select == "retrieval":
            return cls(candidates=candidates, probes=probes, probe_tokens=probe_tokens, answers_first=True)
        raise InputError(f"--select {select!r} has no greedy order (choose kl or retrieval)")

    def check(self) -> None:
        """adaskip-build's checks of its --select flags (adaskip-eval checks its own --kl-* flags)."""
        for name, value, least in (("--select-candidates", self.candidates, 1),
                                   ("--probes", self.probes, 1 if self.answers_first else 0),
                                   ("--probe-tokens", self.probe_tokens, tasks.MIN_CONTEXT if self.probes else 0)):
            if value < least:
                raise InputError(f"{name} must be >= {least}; got {value}")

    def record(self) -> dict[str, Any]:
        r = asdict(self)
        if not self.probes:
            for name in ("probe_tokens", "answers_first", "seed"):
                del r[name]
        return r


def greedy_order(engine: TorchEngine, tokenizer: Any, prompts: list[list[int]], similarity: list[float],
                 scales: list[float], compensation: Compensation | None, k_max: int, recipe: GreedyRecipe,
                 phase: str, chat: bool, progress: bool = True) -> list[int]:
    """The first `k_max` sublayers of the recipe's greedy order, from the calibration `prompts` and `similarity`
    (the pass's statistics), each skip replaced by `scales` / `compensation` (the plan's stand-in)."""
    windows = [p[:recipe.window_tokens] for p in prompts[:recipe.windows]]
    candidates = rank_by_similarity(similarity)[:max(recipe.candidates, k_max)]
    try:
        probes = tasks.answer_probes(tokenizer, recipe.probe_tokens, recipe.probes, recipe.seed, chat=chat,
                                     phase=phase) if recipe.probes else None
    except InputError as e:
        raise InputError(f"retrieval probes of {recipe.probe_tokens} tokens: {e}") from e
    return comp.kl_greedy_order(engine, windows, k_max, candidates, scales, compensation, progress=progress,
                                probes=probes, phase=phase, answers_first=recipe.answers_first)
