"""Training-free stand-ins for skipped sublayers, and a selection rule that looks at a skip's effect on the output.

The paper replaces a skipped sublayer by r * h with r = ||h'||_F / ||h||_F over the whole prompt, a ratio dominated
by the few tokens of very large norm (the first token's attention sink). Fitted on the same calibration pass:

  token-ratio     scalar: the mean over tokens of ||h'_t|| / ||h_t||
  channel-scale   per channel c: s_c = sum_t h_tc h'_tc / sum_t h_tc^2          (least squares, h' ~ s * h)
  channel-affine  per channel c: h'_c ~ a_c h_c + b_c                            (least squares with intercept)

Channel fits leave out each prompt's first token (the attention sink, whose huge activations would otherwise set
the fit of the channels it occupies); applying them to it is harmless because sink channels pass through nearly
unchanged. The selection rule `kl_greedy_order` adds, one at a time, the sublayer whose skip (with its stand-in)
moves the final next-token distribution least (KL from the full model on calibration text), given those already
skipped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from adaskip.calibrate.importance import CalibrationCache, calibrate
from adaskip.calibrate.corpus import CalibrationSet
from adaskip.model.spec import LoadedModel
from adaskip.plan import COMPENSATION_RULES, Calibration, Compensation
from adaskip.runtime.torch_engine import TorchEngine

RULES = COMPENSATION_RULES  # the stand-ins a plan can name (adaskip/plan.py)
SINK_TOKENS = 1  # leading tokens of each prompt left out of the channel fits
RIDGE = 1e-6  # relative regularizer of the per-channel variance (channels that never move keep scale 1)


@dataclass
class ChannelStats:
    """Per sublayer j, float64 sums over calibration tokens of h (input) and o (output) per channel."""

    n: torch.Tensor  # [S] tokens in the channel fits
    h: torch.Tensor  # [S, D] sum h
    o: torch.Tensor  # [S, D] sum o
    hh: torch.Tensor  # [S, D] sum h^2
    ho: torch.Tensor  # [S, D] sum h * o
    ratio: torch.Tensor  # [S] sum over all tokens of ||o_t|| / ||h_t||
    ratio_n: torch.Tensor  # [S] tokens in `ratio`

    @classmethod
    def zeros(cls, sublayers: int, hidden: int) -> "ChannelStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(z(sublayers), z(sublayers, hidden), z(sublayers, hidden), z(sublayers, hidden),
                   z(sublayers, hidden), z(sublayers), z(sublayers))

    def observe(self, j: int, h: torch.Tensor, out: torch.Tensor, valid: torch.Tensor) -> None:
        """Engine observer: h, out [B, T, D], valid [B, T]."""
        h, out = h.double(), out.double()
        keep = valid.clone()
        norms_h, norms_o = h.norm(dim=-1), out.norm(dim=-1)
        self.ratio[j] += (norms_o / norms_h.clamp_min(1e-12))[valid].sum()
        self.ratio_n[j] += valid.sum()
        for b in range(keep.shape[0]):  # drop each row's first real tokens (left padding comes before them)
            first = torch.nonzero(keep[b]).flatten()[:SINK_TOKENS]
            keep[b, first] = False
        hs, os_ = h[keep], out[keep]
        self.n[j] += hs.shape[0]
        self.h[j] += hs.sum(0)
        self.o[j] += os_.sum(0)
        self.hh[j] += (hs * hs).sum(0)
        self.ho[j] += (hs * os_).sum(0)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> "ChannelStats":
        return cls(**d)



def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) per position, in nats: both [N, V] -> [N] (>= 0, 0 when the distributions agree)."""
    ref = torch.log_softmax(reference_logits.double(), -1)
    other = torch.log_softmax(logits.double(), -1)
    return (ref.exp() * (ref - other)).sum(-1).clamp_min(0.0)

def collect(engine: TorchEngine, data: CalibrationSet, progress: bool = True) -> tuple[Calibration, ChannelStats]:
    """One calibration pass: the plan's similarity / norm-ratio statistics and the channel sums, together."""
    stats = ChannelStats.zeros(engine.spec.num_sublayers, engine.spec.hidden_size)
    previous, engine.observer = engine.observer, stats.observe
    try:
        calib = calibrate(engine, data, progress=progress)
    finally:
        engine.observer = previous
    return calib, stats


def cached_collect(model: LoadedModel, data: CalibrationSet, use_cache: bool = True,
                   progress: bool = True) -> tuple[Calibration, ChannelStats, bool]:
    """`collect` on the reference engine through the calibration cache: (statistics, channel sums, whether they came
    from the cache). The pass's statistics also serve later norm-ratio builds on the same prompts."""
    cache = CalibrationCache() if use_cache else None
    hit = cache.get_channels(model.fingerprint, data) if cache else None
    if hit is not None:
        return hit[0], ChannelStats.from_dict(hit[1]), True
    calib, stats = collect(TorchEngine.from_loaded(model), data, progress=progress)
    if cache:
        cache.put(model.fingerprint, data, calib, "torch", channels=stats.to_dict())
    return calib, stats, False


def fit(rule: str, stats: ChannelStats, calib: Calibration) -> tuple[list[float], Compensation | None]:
    """(scalar scales per sublayer, per-channel compensation or None) for a stand-in rule."""
    if rule not in RULES:
        raise ValueError(f"unknown compensation rule {rule!r}; choose from {', '.join(RULES)}")
    if rule == "norm-ratio":
        return list(calib.norm_ratio), None
    token = (stats.ratio / stats.ratio_n.clamp_min(1)).tolist()
    if rule == "token-ratio":
        return token, Compensation("token-ratio")
    n = stats.n.clamp_min(1)[:, None]
    if rule == "channel-scale":
        scale = stats.ho / (stats.hh + RIDGE * stats.hh.mean(-1, keepdim=True)).clamp_min(1e-30)
        shift = torch.zeros_like(scale)
    else:
        mh, mo = stats.h / n, stats.o / n
        var = stats.hh / n - mh * mh
        cov = stats.ho / n - mh * mo
        scale = cov / (var + RIDGE * var.mean(-1, keepdim=True)).clamp_min(1e-30)
        shift = mo - scale * mh
    sub = {j: (scale[j].tolist(), shift[j].tolist()) for j in range(scale.shape[0]) if stats.n[j] > 0}
    return token, Compensation(rule, sub)


def _skipping_engine(spec: Any, model_weights: Any, skip: list[int], compensation: Compensation | None) -> TorchEngine:
    """An engine carrying the stand-ins of the sublayers in `skip` only (the others run)."""
    comp = Compensation(compensation.rule, {j: v for j, v in compensation.sublayers.items() if j in skip}) \
        if compensation else None
    return TorchEngine(spec, model_weights, comp)


class Resumes:
    """The full model's input to chosen sublayers over fixed prompts (TorchEngine.sublayer_inputs, from the same
    forward that gives the prompts' reference logits), so that a skip set whose first skipped sublayer is one of
    them runs only from there: everything before it is the full model's, exactly (the same ops on the same inputs).
    A candidate in the upper half of the model (where the similarity ranking puts most of them) then costs under
    half a forward."""

    def __init__(self, inputs: list[dict[int, torch.Tensor]]):
        self.inputs = inputs  # per prompt: sublayer -> its input ({}: nothing kept, run from the start)

    def at(self, prompt: int, skip: list[int]) -> tuple[int, torch.Tensor] | None:
        """Where prompt `prompt` resumes under `skip` (None: from the start)."""
        first = min(skip, default=None)
        h = self.inputs[prompt].get(first) if first is not None else None
        return None if h is None else (first, h)


def mean_kl(model_weights: Any, spec: Any, windows: list[list[int]], reference: list[torch.Tensor],
            skip: list[int], scales: list[float], compensation: Compensation | None,
            resumes: Resumes | None = None) -> float:
    """Mean next-token KL(full || skipped) over every position of `windows` (prefill mode: one forward each)."""
    engine = _skipping_engine(spec, model_weights, skip, compensation)
    kls = [kl_divergence(ref, engine.teacher_forced_logits(ids, skip, scales,
                                                           resume=resumes.at(n, skip) if resumes else None))
           for n, (ids, ref) in enumerate(zip(windows, reference))]
    return float(torch.cat(kls).mean())


def reference_logits(engine: TorchEngine, windows: list[list[int]]) -> list[torch.Tensor]:
    return [engine.teacher_forced_logits(ids, [], [1.0] * engine.spec.num_sublayers) for ids in windows]


PHASES = ("all", "decode")  # where a selection scores a skip: every position, or decode steps after a full prefill


def phase_of(mode: str) -> str:
    """Where a plan of `mode` skips: decode mode only in decode steps (its prompt runs the full model), prefill and
    e2e mode in every forward (prefill mode skips in decode steps too: SkipLayout.decode_skip_at)."""
    return "decode" if mode == "decode" else "all"


@dataclass
class Probe:
    """A prompt whose effect is scored at some positions only: `ids` fed in one forward, `positions` the ones whose
    next-token distributions count (a retrieval prompt with its answer appended: the positions that predict the
    answer's tokens). The first `prefix` ids are run by the full model, the rest with the skips: a decode-mode plan
    prefills its prompt unskipped and skips only in the decode steps that follow."""

    ids: list[int]
    positions: list[int]
    prefix: int = 0
    targets: list[int] | None = None  # the token each position should predict (a retrieval answer's), if known


def decode_windows(windows: list[list[int]]) -> list[Probe]:
    """Plain-text windows scored as decode mode serves them: the first half prefilled by the full model, the second
    half teacher-forced through the skipped decode steps."""
    return [Probe(w, list(range(len(w) // 2, len(w))), len(w) // 2) for w in windows]


def probe_reference(engine: TorchEngine, probes: list[Probe]) -> list[torch.Tensor]:
    """The full model's logits at each probe's positions."""
    return [engine.teacher_forced_logits(p.ids, [], [1.0] * engine.spec.num_sublayers, logits_at=p.positions)
            for p in probes]


class ProbeScorer:
    """Scores skip sets on a fixed list of probes: the full model's logits at their positions and its K/V of their
    unskipped prefixes are computed once, so each skip set costs only the forwards of the skipped parts."""

    def __init__(self, engine: TorchEngine, probes: list[Probe], resume_at: list[int] | None = None):
        """`resume_at`: sublayers whose full-model input is kept for the probes without a prefix (Resumes)."""
        self.engine = engine
        self.probes = [p for p in probes if p.positions]  # a decode-phase probe of a one-token answer scores nothing
        if not self.probes:
            raise ValueError("no probe has a position to score")
        if any(p.prefix and min(p.positions) < p.prefix for p in self.probes):
            raise ValueError("a probe scores a position inside its full-model prefix (unskipped: nothing to score)")
        n = engine.spec.num_sublayers
        # per probe, the full model's K/V of its prefix, every layer (None: no prefix); held while the scorer lives
        self.prefixes: list[Any] = []
        self.reference: list[torch.Tensor] = []  # the full model's logits at each probe's positions
        kept: list[dict[int, torch.Tensor]] = []  # per probe, the full model's inputs to `resume_at` (no prefix)
        for p in self.probes:
            if p.prefix == 0:  # one full-model forward: the reference and the inputs to resume from
                logits, inputs = engine.sublayer_inputs(p.ids, resume_at or [], p.positions)
                self.prefixes.append(None)
                self.reference.append(logits)
                kept.append(inputs)
                continue
            kept.append({})
            cache = engine.new_cache(1, len(p.ids), cached_layers=list(range(engine.spec.num_layers)))
            x = torch.tensor([p.ids[:p.prefix]])
            engine.prefill(x, torch.ones_like(x, dtype=torch.bool), cache, torch.zeros(1, n, dtype=torch.bool),
                           torch.ones(1, n), want_stats=False)
            self.prefixes.append(cache)
            # the reference through the same prefix and suffix forward the skip sets take (one prefill, not two)
            self.reference.append(_suffix_logits(engine, cache, p, [], [1.0] * n))
        self.resumes = Resumes(kept)

    def kl(self, skip: list[int], scales: list[float], compensation: Compensation | None) -> float:
        """Mean over probes of the mean next-token KL(full || skipped) at each probe's positions."""
        return self.score(skip, scales, compensation)[1]

    def score(self, skip: list[int], scales: list[float], compensation: Compensation | None) -> tuple[int, float]:
        """(probes whose answer the skipped model gets wrong, mean KL as `kl`). An answer is right when the argmax at
        every position is its target token: teacher-forced, so exactly the greedy answer's tokens while they are
        right. Probes without targets count as right."""
        engine = _skipping_engine(self.engine.spec, self.engine.w, skip, compensation)
        kls, wrong = [], 0
        for i, (p, ref, cache) in enumerate(zip(self.probes, self.reference, self.prefixes)):
            if cache is None:
                logits = engine.teacher_forced_logits(p.ids, skip, scales, logits_at=p.positions,
                                                      resume=self.resumes.at(i, skip))
            else:
                logits = _suffix_logits(engine, cache, p, skip, scales)
            kls.append(float(kl_divergence(ref, logits).mean()))
            if p.targets is not None and logits.argmax(-1).tolist() != p.targets:
                wrong += 1
        return wrong, sum(kls) / len(kls)


def _suffix_logits(engine: TorchEngine, cache: Any, p: Probe, skip: list[int], scales: list[float]) -> torch.Tensor:
    """The logits at p.positions with p.ids[p.prefix:] run with `skip` after the cached full-model prefix (one
    chunk: the same attention as one decode step per token); the cache is left holding the prefix only."""
    n = engine.spec.num_sublayers
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, skip] = True
    x = torch.tensor([p.ids[p.prefix:]])
    try:
        out = engine.prefill(x, torch.ones_like(x, dtype=torch.bool), cache, mask, torch.tensor([scales]),
                             all_logits=True, want_stats=False)
    finally:  # back to the prefix (the suffix's K/V slots are overwritten by the next call)
        cache.length = p.prefix
        cache.next_pos[:] = p.prefix
        cache.valid[:, p.prefix:] = False
    return out.logits[0][[q - p.prefix for q in p.positions]]


class WindowScorer:
    """Mean next-token KL(full || skipped) on plain-text windows, where a plan of `phase` skips: "all" (prefill and
    e2e mode) at every position with the set skipped in every forward (mean_kl), "decode" (decode mode) on each
    window's second half after an unskipped first half (decode_windows)."""

    def __init__(self, engine: TorchEngine, windows: list[list[int]], phase: str = "all",
                 resume_at: list[int] | None = None):
        """`resume_at`: sublayers whose full-model input is kept for the windows (Resumes; phase "all" only)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}; got {phase!r}")
        self.engine, self.windows = engine, windows
        self.decode = ProbeScorer(engine, decode_windows(windows)) if phase == "decode" else None
        # one full-model forward per window (phase "all"): its reference logits and its inputs to resume from
        runs = [engine.sublayer_inputs(ids, resume_at or []) for ids in windows] if self.decode is None else []
        self.reference = [logits for logits, _ in runs]
        self.resumes = Resumes([inputs for _, inputs in runs])

    def kl(self, skip: list[int], scales: list[float], compensation: Compensation | None) -> float:
        if self.decode is not None:
            return self.decode.kl(skip, scales, compensation)
        return mean_kl(self.engine.w, self.engine.spec, self.windows, self.reference, skip, scales, compensation,
                       self.resumes)


def kl_greedy_order(engine: TorchEngine, windows: list[list[int]], k: int, candidates: list[int],
                    scales: list[float], compensation: Compensation | None, progress: bool = True,
                    probes: list[Probe] | None = None, phase: str = "all", answers_first: bool = False) -> list[int]:
    """Greedy selection: repeatedly add the candidate whose skip (with its stand-in) gives the lowest mean KL from
    the full model on `windows`, given the sublayers already chosen. Returns the first k choices in order.

    With `probes` (retrieval-aware): the score is the windows' mean KL plus the probes' mean KL at their answer
    positions, so a skip that plain text tolerates but that breaks long-range retrieval ranks late.
    `phase` is where the windows are scored (WindowScorer); the probes are scored as given (tasks.answer_probes
    builds them for either phase). `answers_first`: candidates are compared first by how many probe answers they
    get wrong (exact match, what the retrieval tasks score; the KL at a confident answer token barely moves when the
    token flips), then by the KL sum."""
    if answers_first and not probes:
        raise ValueError("answers_first ranks by the probes' answers: give probes")
    text = WindowScorer(engine, windows, phase, resume_at=candidates)
    retrieval = ProbeScorer(engine, probes, resume_at=candidates) if probes else None
    chosen: list[int] = []
    total = sum(len(candidates) - i for i in range(min(k, len(candidates))))
    bar = tqdm(total=total, desc="kl-greedy selection", unit="forward", disable=not progress, file=sys.stderr)
    try:
        while len(chosen) < min(k, len(candidates)):
            best, best_score = None, (float("inf"), float("inf"))
            for j in candidates:
                if j in chosen:
                    continue
                wrong, kl = 0, text.kl(chosen + [j], scales, compensation)
                if retrieval is not None:
                    missed, probe_kl = retrieval.score(chosen + [j], scales, compensation)
                    kl += probe_kl
                    wrong = missed if answers_first else 0
                bar.update(1)
                if (wrong, kl) < best_score:
                    best, best_score = j, (wrong, kl)
            chosen.append(best)
    finally:
        bar.close()
    return chosen
