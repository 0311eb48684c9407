"""adaskip-verify: run an engine and the reference torch engine side by side on the same prompts.

Both engines get identical inputs every step: prefill, then greedy decode steps teacher-forced with the reference's
tokens, under the same SkipPolicy state (fed with the reference's stats), so any difference is the backend's own.
Prefill is compared both ways an engine runs it: as the Generator runs it (no stats, the last-token tail) and with
similarity stats (every token).
Per step, polygraphy's comparator checks logits and the similarity stats against the tolerance; we report the
largest differences and how often the candidate's greedy token agrees with the reference's.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from adaskip.cli.common import main_wrapper
from adaskip.errors import EngineDirError, InputError
from adaskip.policy import SkipPolicy
from adaskip.runtime.engine import StepOutput
from adaskip.runtime.generate import stack_masks


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


def compare_engines(reference: Any, candidate: Any, policy: SkipPolicy, prompts: list[list[int]],
                    decode_steps: int, atol: float | None = 1e-4) -> VerifyReport:
    from polygraphy.comparator import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    compare = SimpleCompareFunc(atol=atol if atol is not None else float("inf"), rtol=0.0)
    report = VerifyReport(atol=atol)
    agree = 0
    for ids in prompts:
        x = torch.tensor([ids])
        caches = [e.new_cache(1, len(ids) + decode_steps, policy.layout.cached_layers) for e in (reference, candidate)]
        state = policy.new_request()
        skip, scales = stack_masks([policy.prefill_mask(state)])
        valid = torch.ones_like(x, dtype=torch.bool)
        # each engine prefills twice: as the Generator does (no stats, the last-token tail) into the cache decode
        # goes on with, and with stats (every token) into a spare cache; each pass is compared with the same pass
        outs, measured = [], []
        for engine, cache in zip((reference, candidate), caches):
            fast = engine.prefill(x, valid, cache, skip, scales, want_stats=False)
            spare = engine.new_cache(1, len(ids) + decode_steps, policy.layout.cached_layers)
            measured.append(engine.prefill(x, valid, spare, skip, scales))
            outs.append(StepOutput(logits=fast.logits, similarity=measured[-1].similarity,
                                   norm_ratio=measured[-1].norm_ratio))
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
            if step == decode_steps:
                break
            skip, scales = stack_masks([policy.decode_mask(state)])
            outs = [e.decode(token, c, skip, scales) for e, c in zip((reference, candidate), caches)]
            policy.observe_decode(state, outs[0].similarity[0].tolist(), outs[0].norm_ratio[0].tolist())
        report.details.append({"prompt_tokens": len(ids), "max_logit_diff": prompt_worst["logits"],
                               "max_similarity_diff": prompt_worst["stats"],
                               "token_agreement": prompt_worst["agree"] / (decode_steps + 1),
                               "online_ffns": sorted(state.online)})
        report.max_logit_diff = max(report.max_logit_diff, prompt_worst["logits"])
        report.max_similarity_diff = max(report.max_similarity_diff, prompt_worst["stats"])
    report.prompts = len(prompts)
    report.token_agreement = agree / max(report.steps, 1)
    return report


def verification_prompts(tokenizer: Any, count: int, tokens: int) -> list[list[int]]:
    """Windows of the built-in real-text corpus (the same text calibration uses by default)."""
    from adaskip.calibrate.corpus import builtin_text

    ids = tokenizer.encode(builtin_text(), add_special_tokens=False)
    stride = max(len(ids) // max(count, 1), tokens)
    prompts = [ids[i * stride:i * stride + tokens] for i in range(count)]
    if any(len(p) < tokens for p in prompts):
        raise InputError(f"--prompt-tokens {tokens} x --prompts {count} exceeds the built-in corpus")
    return prompts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaskip-verify", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Compare an engine with the reference torch engine on real text.")
    p.add_argument("--engine", required=True, help="engine directory to verify")
    p.add_argument("--model", help="source of the reference weights (default: the source recorded at build time); "
                                   "must have the engine's fingerprint")
    p.add_argument("--prompts", type=int, default=3, help="number of prompts")
    p.add_argument("--prompt-tokens", type=int, default=512, help="tokens per prompt")
    p.add_argument("--decode-steps", type=int, default=32, help="greedy decode steps compared per prompt")
    p.add_argument("--atol", type=float, help="max |difference| allowed (default 1e-4; report only for int4)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


@main_wrapper("adaskip-verify")
def main(argv: list[str] | None = None) -> int:
    from adaskip.engine_dir import open_engine_dir
    from adaskip.errors import EngineDirError
    from adaskip.model import load_model
    from adaskip.runtime.loader import load_runtime
    from adaskip.runtime.torch_engine import TorchEngine

    a = parser().parse_args(argv)
    if a.prompts < 1 or a.prompt_tokens < 1 or a.decode_steps < 0:
        raise InputError("--prompts and --prompt-tokens must be >= 1, --decode-steps >= 0")
    ed = open_engine_dir(a.engine, verify_large_files=True)  # every file against its digest
    if a.decode_steps >= ed.spec.max_position_embeddings:
        raise InputError(f"--decode-steps must leave room for a prompt in the model's context of "
                         f"{ed.spec.max_position_embeddings} tokens")
    options = ed.manifest["build"].get("options", {})
    quantized = options.get("quantize")
    atol = a.atol if a.atol is not None else (None if quantized else 1e-4)
    source = a.model or ed.manifest["build"].get("source")
    reference_model = load_model(source, dtype=options.get("dtype", "float32"))  # the fingerprint covers the dtype
    if reference_model.fingerprint != ed.fingerprint:
        raise EngineDirError(f"{source} is not the model this engine was built from (fingerprint differs); pass "
                             f"--model with the original model")
    runtime = load_runtime(ed.root)
    tokenizer = runtime.tokenizer
    prompt_tokens = min(a.prompt_tokens, ed.spec.max_position_embeddings - a.decode_steps)
    prompts = verification_prompts(tokenizer, a.prompts, prompt_tokens)
    report = compare_engines(TorchEngine.from_loaded(reference_model, runtime.policy.layout.compensation), runtime.engine, runtime.policy, prompts,
                             a.decode_steps, atol)
    if a.json:
        print(json.dumps({**asdict(report), "passed": report.passed, "backend": ed.backend,
                          "quantize": quantized}, indent=2))
    else:
        print(f"engine {ed.root} ({ed.backend}{', ' + quantized if quantized else ''}) vs reference torch engine, "
              f"fp32: {report.prompts} prompts x {prompt_tokens} tokens + {a.decode_steps} decode steps")
        print(f"  max |logit diff|        {report.max_logit_diff:.3e}")
        print(f"  max |similarity diff|   {report.max_similarity_diff:.3e}  (IO similarity and norm ratio)")
        print(f"  greedy token agreement  {report.token_agreement:.4f}  ({report.steps} steps)")
        print(f"  verdict                 {'PASS' if report.passed else 'FAIL'}"
              + (f" at atol {atol:g}" if atol is not None else " (report only: quantized engine)"))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
