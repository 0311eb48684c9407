"""adaskip-verify: run an engine and the reference torch engine side by side on the same prompts.

Both engines get identical inputs every step: prefill, then greedy decode steps teacher-forced with the reference's
tokens, under the same SkipPolicy state (fed with the reference's stats), so any difference is the backend's own.
Prefill is compared both ways an engine runs it: as the Generator runs it (no stats, the last-token tail) and with
similarity stats (every token).
Per step, polygraphy's comparator checks logits and the similarity stats against the tolerance; we report the
largest differences and how often the candidate's greedy token agrees with the reference's.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from adaskip.calibrate.corpus import builtin_text
from adaskip.engine_dir import open_engine_dir
from adaskip.errors import EngineDirError, InputError
from adaskip.model import load_model
from adaskip.policy import SkipPolicy
from adaskip.runtime.engine import StepOutput
from adaskip.runtime.loader import load_runtime
from adaskip.runtime.stepper import Stepper
from adaskip.runtime.torch_engine import TorchEngine

DEFAULT_ATOL = 1e-4  # fp32 engines; a quantized engine is reported, not judged, unless an atol is given


@dataclass
class VerifyOptions:
    """What adaskip-verify compares (adaskip/cli/verify.py fills it from its flags)."""
    engine: str  # the engine directory to verify
    model: str | None = None  # the reference weights; None: the source recorded at build time
    prompts: int = 3
    prompt_tokens: int = 512  # per prompt (cut to leave room for the decode steps in the model's context)
    decode_steps: int = 32  # greedy decode steps compared per prompt
    atol: float | None = None  # None: DEFAULT_ATOL, or report only for a quantized engine
    # stage lines and a progress bar on stderr (the CLI turns it on); not part of what is verified
    progress: bool = field(default=False, compare=False)

    def validate(self) -> None:
        if self.prompts < 1 or self.prompt_tokens < 1 or self.decode_steps < 0:
            raise InputError("--prompts and --prompt-tokens must be >= 1, --decode-steps >= 0")
        if self.atol is not None and not (math.isfinite(self.atol) and self.atol >= 0):
            raise InputError(f"--atol must be a finite number >= 0; got {self.atol}")


@dataclass
class VerifyReport:
    prompts: int = 0
    steps: int = 0  # compared forwards (prefill + decode steps) over all prompts
    max_logit_diff: float = 0.0
    max_similarity_diff: float = 0.0  # IO similarity and norm ratio, where the sublayer ran
    token_agreement: float = 1.0  # share of steps whose greedy token equals the reference's
    failed_steps: int = 0  # steps polygraphy's comparator rejected at the tolerance
    atol: float | None = None
    details: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.failed_steps == 0


class Lockstep:
    """Two engines behind one Engine protocol: every forward runs on both with the same inputs; the reference's
    output is returned (so its statistics feed the policy) and the candidate's is kept in `candidate_out`."""

    def __init__(self, reference: Any, candidate: Any):
        self.reference, self.candidate, self.spec = reference, candidate, reference.spec
        self.candidate_out: StepOutput | None = None

    def new_cache(self, batch: int, capacity: int, cached_layers: list[int]) -> tuple[Any, Any]:
        return (self.reference.new_cache(batch, capacity, cached_layers),
                self.candidate.new_cache(batch, capacity, cached_layers))

    def prefill(self, ids, valid, cache, skip, scales, all_logits: bool = False, want_stats: bool = True):
        self.candidate_out = self.candidate.prefill(ids, valid, cache[1], skip, scales, all_logits, want_stats)
        return self.reference.prefill(ids, valid, cache[0], skip, scales, all_logits, want_stats)

    def decode(self, tokens, cache, skip, scales, want_stats: bool = True):
        self.candidate_out = self.candidate.decode(tokens, cache[1], skip, scales, want_stats)
        return self.reference.decode(tokens, cache[0], skip, scales, want_stats)


def compare_engines(reference: Any, candidate: Any, policy: SkipPolicy, prompts: list[list[int]],
                    decode_steps: int, atol: float | None = 1e-4, progress: bool = False) -> VerifyReport:
    from polygraphy.comparator import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    compare = SimpleCompareFunc(atol=atol if atol is not None else float("inf"), rtol=0.0)
    report = VerifyReport(atol=atol)
    pair = Lockstep(reference, candidate)
    stepper = Stepper(pair, policy)
    agree = 0
    bar = tqdm(total=len(prompts) * (decode_steps + 1), unit="step", desc="compare", file=sys.stderr,
               disable=not progress)
    for ids in prompts:
        x = torch.tensor([ids])
        valid = torch.ones_like(x, dtype=torch.bool)
        [row] = stepper.new_rows(1)
        cache = stepper.new_cache(1, len(ids) + decode_steps)
        # each engine prefills twice: as the Generator does (no stats, the last-token tail) into the cache decode
        # goes on with, and with stats (every token) into a spare cache; each pass is compared with the same pass
        fast = (stepper.prefill([row], x, valid, cache), pair.candidate_out)
        measured = (stepper.prefill([row], x, valid, stepper.new_cache(1, len(ids) + decode_steps),
                                    want_stats=True), pair.candidate_out)
        outs = [StepOutput(logits=f.logits, similarity=m.similarity, norm_ratio=m.norm_ratio)
                for f, m in zip(fast, measured)]
        extra = compare(*[IterationResult(outputs={"logits": o.logits.numpy()}, runner_name=name)
                          for o, name in zip(measured, ("reference", "candidate"))])["logits"]
        report.failed_steps += 0 if bool(extra) else 1
        prompt_worst = {"logits": float(extra.max_absdiff), "stats": 0.0, "agree": 0}
        for step in range(decode_steps + 1):
            ref, cand = outs
            sims_r, sims_c = ref.similarity.numpy(), cand.similarity.numpy()
            if not np.array_equal(np.isnan(sims_r), np.isnan(sims_c)):
                raise EngineDirError("the engine and the reference disagree about which sublayers ran: the graph "
                                     "was not built for this plan")
            ran = ~np.isnan(sims_r)
            results = [IterationResult(outputs={
                "logits": o.logits.numpy(), "similarity": np.where(ran, o.similarity.numpy(), 0.0),
                "norm_ratio": np.where(ran, o.norm_ratio.numpy(), 0.0)}, runner_name=name)
                for o, name in ((ref, "reference"), (cand, "candidate"))]
            verdict = compare(*results)
            report.failed_steps += 0 if all(bool(v) for v in verdict.values()) else 1
            logit_diff = float(verdict["logits"].max_absdiff)
            stat_diff = max(float(verdict["similarity"].max_absdiff), float(verdict["norm_ratio"].max_absdiff))
            token = ref.logits.argmax(-1)
            same = bool((cand.logits.argmax(-1) == token).all())
            agree += same
            prompt_worst = {"logits": max(prompt_worst["logits"], logit_diff),
                            "stats": max(prompt_worst["stats"], stat_diff), "agree": prompt_worst["agree"] + same}
            report.steps += 1
            bar.update()
            if step == decode_steps:
                break
            # teacher-forced with the reference's token; the reference's stats feed the policy
            outs = [stepper.decode([row], token, cache), pair.candidate_out]
        report.details.append({"prompt_tokens": len(ids), "max_logit_diff": prompt_worst["logits"],
                               "max_similarity_diff": prompt_worst["stats"],
                               "token_agreement": prompt_worst["agree"] / (decode_steps + 1),
                               "online_ffns": sorted(row.state.online)})
        report.max_logit_diff = max(report.max_logit_diff, prompt_worst["logits"])
        report.max_similarity_diff = max(report.max_similarity_diff, prompt_worst["stats"])
    bar.close()
    report.prompts = len(prompts)
    report.token_agreement = agree / max(report.steps, 1)
    return report


def verification_prompts(tokenizer: Any, count: int, tokens: int) -> list[list[int]]:
    """Windows of the built-in real-text corpus (the same text calibration uses by default)."""
    ids = tokenizer.encode(builtin_text(), add_special_tokens=False)
    stride = max(len(ids) // max(count, 1), tokens)
    prompts = [ids[i * stride:i * stride + tokens] for i in range(count)]
    if any(len(p) < tokens for p in prompts):
        raise InputError(f"--prompt-tokens {tokens} x --prompts {count} exceeds the built-in corpus")
    return prompts


@dataclass
class Verification:
    """A verified engine: the comparison and what it was run against."""
    report: VerifyReport
    engine: Path
    backend: str
    quantize: str | None
    atol: float | None  # None: report only (quantized engine, no --atol)
    prompt_tokens: int  # per prompt, as run


def verify_engine(opts: VerifyOptions) -> Verification:
    """Check the engine directory's files, load the reference weights it was built from (same fingerprint), and
    compare the engine with the reference torch engine on windows of the built-in corpus."""
    opts.validate()

    def say(text: str) -> None:
        if opts.progress:
            print(f"adaskip-verify: {text}", file=sys.stderr, flush=True)

    say(f"checking the files of {opts.engine} against their digests")
    ed = open_engine_dir(opts.engine, verify_large_files=True)  # every file against its digest
    if opts.decode_steps >= ed.spec.max_position_embeddings:
        raise InputError(f"--decode-steps must leave room for a prompt in the model's context of "
                         f"{ed.spec.max_position_embeddings} tokens")
    options = ed.manifest["build"].get("options", {})
    kv = options.get("kv_dtype", "float32")  # a float16 / int8 KV cache is judged like quantized weights: reported
    quantized = "+".join(q for q in (options.get("quantize"), None if kv == "float32" else f"kv-{kv}") if q) or None
    atol = opts.atol if opts.atol is not None else (None if quantized else DEFAULT_ATOL)
    source = opts.model or ed.manifest["build"].get("source")
    say(f"loading the reference weights from {source}")
    reference_model = load_model(source, dtype=options.get("dtype", "float32"))  # the fingerprint covers the dtype
    if reference_model.fingerprint != ed.fingerprint:
        raise EngineDirError(f"{source} is not the model this engine was built from (fingerprint differs); pass "
                             f"--model with the original model")
    runtime = load_runtime(ed.root)
    tokenizer = runtime.tokenizer
    prompt_tokens = min(opts.prompt_tokens, ed.spec.max_position_embeddings - opts.decode_steps)
    prompts = verification_prompts(tokenizer, opts.prompts, prompt_tokens)
    say(f"running both engines on {len(prompts)} prompts x {prompt_tokens} tokens + {opts.decode_steps} decode steps")
    report = compare_engines(TorchEngine.from_loaded(reference_model, runtime.policy.layout.compensation),
                             runtime.engine, runtime.policy, prompts, opts.decode_steps, atol, progress=opts.progress)
    return Verification(report, ed.root, ed.backend, quantized, atol, prompt_tokens)
