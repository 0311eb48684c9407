"""adaskip-verify: compare an engine with the reference torch engine on real text (adaskip/eval/verify.py)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from adaskip.cli.common import ArgumentParser, HelpFormatter, defaults, main_wrapper
from adaskip.eval.verify import DEFAULT_ATOL, VerifyOptions, verify_engine


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="adaskip-verify", formatter_class=HelpFormatter,
                                description="Compare an engine with the reference torch engine on real text.")
    d = defaults(VerifyOptions)
    p.add_argument("--engine", required=True, help="engine directory to verify")
    p.add_argument("--model", help="source of the reference weights (default: the source recorded at build time); "
                                   "must have the engine's fingerprint")
    p.add_argument("--prompts", type=int, default=d.prompts, help="number of prompts")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="tokens per prompt")
    p.add_argument("--decode-steps", type=int, default=d.decode_steps, help="greedy decode steps compared per prompt")
    p.add_argument("--atol", type=float,
                   help=f"max |difference| allowed (default {DEFAULT_ATOL:g}; report only for int4)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def options(a: argparse.Namespace) -> VerifyOptions:
    return VerifyOptions(engine=a.engine, model=a.model, prompts=a.prompts, prompt_tokens=a.prompt_tokens,
                         decode_steps=a.decode_steps, atol=a.atol, progress=True)


@main_wrapper("adaskip-verify")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    v = verify_engine(options(a))
    report = v.report
    if a.json:
        print(json.dumps({**asdict(report), "passed": report.passed, "backend": v.backend,
                          "quantize": v.quantize}, indent=2))
    else:
        print(f"engine {v.engine} ({v.backend}{', ' + v.quantize if v.quantize else ''}) vs reference torch engine, "
              f"fp32: {report.prompts} prompts x {v.prompt_tokens} tokens + {a.decode_steps} decode steps")
        print(f"  max |logit diff|        {report.max_logit_diff:.3e}")
        print(f"  max |similarity diff|   {report.max_similarity_diff:.3e}  (IO similarity and norm ratio)")
        print(f"  greedy token agreement  {report.token_agreement:.4f}  ({report.steps} steps)")
        print(f"  verdict                 {'PASS' if report.passed else 'FAIL'}"
              + (f" at atol {v.atol:g}" if v.atol is not None else " (report only: quantized engine)"))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
