"""adaskip-eval: quality of every skipping method at equal budget, in every mode, on long-context tasks.

    adaskip-eval --model smollm2-135m --methods adaskip,adaskip-best,early-exit,skipdecode,unified \\
                 --budgets 1,2,4,6,8 --modes prefill,decode,e2e --contexts 1024,2048 --questions 100 \\
                 --samples 8 --out eval-out

Results are resumable: every finished (document, configuration) is a few lines of `results-<config>.jsonl` in
--out, the full model's outputs one file per document, and the calibration and the compensation study are cached
there too, so a rerun (after an interruption, or with more contexts, methods, --samples or --questions) computes
only what is missing, and the report covers every record of that configuration. Documents run one at a time
through every configuration, so an interrupted run is still a paired comparison on the documents it finished.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from adaskip.cli.common import ArgumentParser, HelpFormatter, defaults, int_list, joined, main_wrapper, word_list
from adaskip.errors import InputError
from adaskip.eval import report
from adaskip.calibrate.tasks import PROMPT_FORMATS
from adaskip.eval.runner import EvalOptions, Evaluator


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="adaskip-eval", description=__doc__, formatter_class=HelpFormatter)
    d = defaults(EvalOptions)
    p.add_argument("--model", required=True, help="model source (built-in name, HF dir, .gguf, cached hub id)")
    p.add_argument("--engine", help="also evaluate this built engine directory (its own plan) as one more row")
    p.add_argument("--methods", default=joined(d.methods),
                   help="comma-separated: adaskip[+MOD...], adaskip-best, early-exit, skipdecode, unified; MODs: "
                        "token-ratio, channel-scale, channel-affine, kl, ret (KL plus KL at retrieval answers; "
                        "retN: answers of N-token probes, default --kl-tokens), served (kl/ret score a decode-mode "
                        "plan's skips on decode steps after a full prefill), em (ret ranks by the probes' exact-match "
                        "answers first, then KL), attn, ffn, no-online, task-calib")
    p.add_argument("--budgets", default=joined(d.budgets), help="K sublayers (baselines: K/2 layers, even K only)")
    p.add_argument("--modes", default=joined(d.modes))
    p.add_argument("--contexts", default=joined(d.contexts), help="prompt lengths in tokens")
    p.add_argument("--tasks", default=joined(d.tasks),
                   help="summary documents also give the LM metrics (perplexity, KL)")
    p.add_argument("--samples", type=int, default=d.samples, help="documents per task and context")
    p.add_argument("--questions", type=int, default=d.questions,
                   help="at least this many retrieval questions per (method, K, mode, context) cell, the same "
                        "questions for every method (retrieval documents per task: enough for it; e.g. 100 -> 13 "
                        "each of passkey (1 question), multikey (4), kv (3))")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--calib-prompts", type=int, default=d.calib_prompts)
    p.add_argument("--calib-tokens", type=int, default=d.calib_tokens)
    p.add_argument("--window", type=int, default=d.window, help="online decode window W")
    p.add_argument("--summary-tokens", type=int, default=d.summary_tokens, help="greedy tokens per summary")
    p.add_argument("--lm-tokens", type=int, default=d.lm_tokens, help="teacher-forced real tokens per document")
    p.add_argument("--study-windows", type=int, default=d.study_windows,
                   help="held-out windows of the compensation study")
    p.add_argument("--study-tokens", type=int, default=d.study_tokens)
    p.add_argument("--kl-windows", type=int, default=d.kl_windows,
                   help="calibration windows of the greedy KL selection")
    p.add_argument("--kl-tokens", type=int, default=d.kl_tokens)
    p.add_argument("--kl-candidates", type=int, default=d.kl_candidates,
                   help="most similar sublayers the KL selection tries")
    p.add_argument("--ret-probes", type=int, default=d.ret_probes,
                   help="the `ret` selection (adaskip+ret): synthetic retrieval prompts (of --kl-tokens tokens, "
                        "or N for retN) from seeds disjoint from the evaluated ones, scored at their answer positions")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=d.prompt_format,
                   help="task prompts in the chat template or as plain text ending in 'Answer:' (auto: chat when "
                        "the tokenizer has a template, plain for built-in base models)")
    p.add_argument("--out", required=True, help="output folder (results, caches, quality.md/json/png)")
    p.add_argument("--doc", help="also write the report here (e.g. docs/quality.md), its plot beside it")
    p.add_argument("--notes", help="markdown file appended to the report (the human reading of the numbers)")
    p.add_argument("--report-only", action="store_true",
                   help="evaluate nothing: rewrite the report from the records already in --out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def options(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(
        model=args.model, out=args.out, engine=args.engine, methods=word_list(args.methods),
        budgets=int_list(args.budgets, "--budgets"), modes=word_list(args.modes),
        contexts=int_list(args.contexts, "--contexts"), tasks=word_list(args.tasks), samples=args.samples,
        questions=args.questions,
        seed=args.seed, calib_prompts=args.calib_prompts, calib_tokens=args.calib_tokens, window=args.window,
        summary_tokens=args.summary_tokens, lm_tokens=args.lm_tokens, study_windows=args.study_windows,
        study_tokens=args.study_tokens, kl_windows=args.kl_windows, kl_tokens=args.kl_tokens,
        kl_candidates=args.kl_candidates, ret_probes=args.ret_probes, prompt_format=args.prompt_format,
        progress=not args.quiet)


@main_wrapper("adaskip-eval")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = options(args)
    notes = ""
    if args.notes:
        try:
            notes = Path(args.notes).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"--notes file {args.notes} does not exist") from None
    if args.doc:  # a document that cannot take the section fails now, not after hours of evaluation
        report.merge_section(report.read_document(Path(args.doc)), opts.model, "")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    ev = Evaluator(opts)
    command = "adaskip-eval " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    commands_path = out / f"commands-{ev.digest}.json"
    commands = json.loads(commands_path.read_text()) if commands_path.is_file() else []
    if args.report_only:
        if not ev.records:
            raise InputError(f"--report-only: {out} holds no records of this configuration")
    else:
        if command not in commands:
            commands.append(command)
            commands_path.write_text(json.dumps(commands, indent=1))
        ev.run()
    study = ev.study if ev.study is not None else _cached_study(ev)
    records = list(ev.records.values())
    meta = {"model": opts.model, "layers": ev.spec.num_layers, "fingerprint": ev.model.fingerprint,
            "contexts": sorted({r["context"] for r in records}), "commands": commands, "chat_prompts": ev.chat,
            "threads": ev.threads,
            "options": {k: getattr(opts, k) for k in ("samples", "questions", "seed", "calib_prompts", "calib_tokens",
                                                      "window", "summary_tokens", "lm_tokens")}}
    data = report.write_outputs(records, out, meta, study, Path(args.doc) if args.doc else None, notes)
    for context, vs in data["verdicts"].items():
        print(report.markdown_table([r for r in data["per_context"] if r["context"] == context], with_context=True))
        if vs:
            print()
            print(report.verdict_table(vs))
    print(f"\nadaskip-eval: wrote {out / 'quality.md'}" + (f" and {args.doc}" if args.doc else ""), file=sys.stderr)
    return 0


def _cached_study(ev: Evaluator):
    path = ev.out / f"study-{ev.digest}.json"
    return json.loads(path.read_text()) if path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
