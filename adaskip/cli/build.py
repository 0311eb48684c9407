"""adaskip-build: calibrate which sublayers a model can skip and write an engine directory."""

from __future__ import annotations

import argparse
import sys

from adaskip.builder.build import build
from adaskip.calibrate.corpus import CALIBRATION_ENGINES
from adaskip.builder.options import (BACKENDS, COST_CONTEXT, DEFAULT_PROBE_TOKENS, DEFAULT_PROBES, GRAPH_VARIANTS,
                                     KV_DTYPES, QUANTIZATIONS, STAND_INS, BuildOptions, CalibrationOptions,
                                     EngineOptions, SelectionOptions)
from adaskip.calibrate.selection import SELECTIONS, GreedyRecipe
from adaskip.cli.common import ArgumentParser, HelpFormatter, defaults, main_wrapper
from adaskip.cli.tensorrt_args import add_tensorrt_arguments, tensorrt_options
from adaskip.cli.trtllm_args import add_trtllm_arguments, trtllm_options
from adaskip.export.trtllm.checkpoint import trtllm_build_command
from adaskip.model.builtin import BUILTIN_MODELS
from adaskip.model.load import DTYPES
from adaskip.plan import METHODS, MODES, sublayer_name


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="adaskip-build", description="Calibrate AdaSkip sublayer skipping for a model and build an engine dir.",
        formatter_class=HelpFormatter)
    p.add_argument("--model", required=True,
                   help=f"HF model dir, .gguf file, hub id in the local cache, or built-in: {', '.join(BUILTIN_MODELS)}")
    p.add_argument("--output", "-o", required=True, help="engine directory to write (atomically)")
    ds, dc, de = defaults(SelectionOptions), defaults(CalibrationOptions), defaults(EngineOptions)
    sel = p.add_argument_group("selection")
    sel.add_argument("--method", choices=METHODS, default=ds.method, help="AdaSkip or a baseline of the paper")
    sel.add_argument("--skip", type=int, help="K: sublayers to skip (adaskip) or whole layers k (baselines)")
    sel.add_argument("--alpha", type=float, help="target ideal speedup (> 1); K is derived from the cost model")
    sel.add_argument("--max-kl", type=float, metavar="X",
                     help="quality budget: the largest K whose next-token KL from the full model (nats, mean over a "
                          "held-out slice of the calibration source) stays <= X")
    sel.add_argument("--mode", choices=MODES, default=ds.mode, help="which phases skip (see README)")
    sel.add_argument("--context-len", type=int,
                     help=f"context length the cost model assumes (default: {COST_CONTEXT} or the model's context if "
                          "shorter)")
    sel.add_argument("--window", type=int, default=ds.window, help="W: decode steps of online importance learning")
    sel.add_argument("--no-online", action="store_true", help="disable online (decode-time) FFN learning")
    sel.add_argument("--stand-in", choices=STAND_INS, default=ds.stand_in,
                     help="what replaces a skipped sublayer: the paper's norm ratio x input, or a map fitted on the "
                          "calibration pass (channel-affine lowered held-out KL 14-25%% on SmolLM2; docs/eval.md)")
    sel.add_argument("--select", choices=SELECTIONS, default=ds.select,
                     help="the ranking K is taken from: similarity (the paper's: the most IO-similar sublayers); kl "
                          "(greedy: each next skip the one that moves the next-token distribution on calibration "
                          "text least, with the stand-in); retrieval (the same greedy, ranking first by how many "
                          "answers of synthetic retrieval prompts a skip gets wrong: the selection that lifted "
                          "Gemma-3-270M's retrieval above Early Exit's at matched speed, docs/quality-paired-em*.md). "
                          "kl and retrieval run the reference torch engine: minutes to an hour on a CPU")
    sel.add_argument("--select-candidates", type=int, metavar="N",
                     help=f"kl / retrieval: the N most IO-similar sublayers the greedy tries (default "
                          f"{GreedyRecipe().candidates}, or K if larger)")
    sel.add_argument("--probes", type=int, metavar="N",
                     help=f"retrieval: synthetic retrieval prompts (passkey, multikey, kv; seeds no evaluation uses) "
                          f"(default {DEFAULT_PROBES})")
    sel.add_argument("--probe-tokens", type=int, metavar="T",
                     help=f"retrieval: tokens per probe (default min({DEFAULT_PROBE_TOKENS}, --context-len); the "
                          f"time grows with it)")
    sel.add_argument("--plan", help="reuse an existing plan.json instead of calibrating (must match the model)")
    cal = p.add_argument_group("calibration")
    cal.add_argument("--calib", help="calibration data: .jsonl (one prompt per record) or text; default: built-in")
    cal.add_argument("--calib-prompts", type=int, default=dc.prompts, help="N: calibration prompts")
    cal.add_argument("--calib-tokens", type=int, default=dc.tokens, help="tokens per calibration prompt")
    cal.add_argument("--calibration", metavar="PLAN", dest="calib_reuse",
                     help="select from the statistics stored in an earlier plan.json of this model (no pass)")
    cal.add_argument("--calib-engine", choices=CALIBRATION_ENGINES, default=dc.engine,
                     help="engine of the calibration pass: auto = the unskipped ort graph on ONNX Runtime where the "
                          "model allows it (same statistics as the reference torch engine, within 1e-5), else torch")
    cal.add_argument("--no-calib-cache", dest="calib_cache", action="store_false",
                     help="calibrate even when a finished calibration of this model and these prompts is cached")
    out = p.add_argument_group("engine")
    out.add_argument("--backend", choices=BACKENDS, default=de.backend,
                     help="ort: ONNX graph on ONNX Runtime; torch: the reference engine (weights as safetensors); "
                          "trtllm-checkpoint: TensorRT-LLM checkpoint + model class for trtllm-build; "
                          "tensorrt: serialized TensorRT engine (built on CPU with TensorRT-RTX; runs on a GPU)")
    out.add_argument("--dtype", choices=DTYPES, default=de.dtype, help="weights dtype")
    out.add_argument("--quantize", choices=QUANTIZATIONS,
                     help="ort backend: weight-only int4 or int8 linear layers and LM head (MatMulNBits, blocks of 32)")
    out.add_argument("--kv-dtype", choices=KV_DTYPES, default=de.kv_dtype,
                     help="ort graph variant: the KV cache's dtype (attention still computes in float32). int8 "
                          "quarters the cache's memory with per-channel scales fitted on the last calibration "
                          "prompts: decode 2-20%% faster, but prefill 1.7-2.9x slower on ONNX Runtime 1.32's CPU "
                          "kernel; float16 halves it, but that kernel decodes ~2x slower with it "
                          "(docs/benchmarks.md)")
    out.add_argument("--graph-variant", choices=GRAPH_VARIANTS, default=de.graph_variant,
                     help="ort backend: 'ort' uses ONNX Runtime's fused GroupQueryAttention (fast), 'portable' only "
                          "standard ops (what TensorRT parses); auto picks ort when the plan allows it")
    out.add_argument("--force", action="store_true", help="replace an existing output directory")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_tensorrt_arguments(p)
    add_trtllm_arguments(p)
    return p


def options(a: argparse.Namespace) -> BuildOptions:
    return BuildOptions(
        model=a.model, output=a.output,
        selection=SelectionOptions(method=a.method, skip=a.skip, alpha=a.alpha, max_kl=a.max_kl, mode=a.mode,
                                   context_len=a.context_len,
                                   window=a.window, online=not a.no_online, stand_in=a.stand_in,
                                   select=a.select, select_candidates=a.select_candidates, probes=a.probes,
                                   probe_tokens=a.probe_tokens, plan=a.plan),
        calibration=CalibrationOptions(data=a.calib, prompts=a.calib_prompts, tokens=a.calib_tokens,
                                       engine=a.calib_engine, cache=a.calib_cache, reuse=a.calib_reuse),
        engine=EngineOptions(backend=a.backend, dtype=a.dtype, quantize=a.quantize, kv_dtype=a.kv_dtype,
                             graph_variant=a.graph_variant,
                             tensorrt=tensorrt_options(a), trtllm=trtllm_options(a)),
        force=a.force, progress=not a.quiet)


@main_wrapper("adaskip-build")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    report = build(options(a))
    plan = report.plan
    names = [sublayer_name(j) for j in plan.skip]
    e = report.expected
    print(f"engine: {report.output}  ({report.seconds:.1f} s)")
    print(f"plan: {plan.method}, mode {plan.mode}, K={plan.k} {plan.budget_unit}; skipped offline: "
          f"{', '.join(names) or 'none'}")
    if plan.selection.get("rule") == "max-kl":
        s = plan.selection
        print(f"max-kl: K={plan.k} is the largest set whose held-out next-token KL stays <= {s['max_kl']} "
              f"(KL {s['heldout_kl']:.4f} nats on {s['heldout']['windows']} x {s['heldout']['tokens']} held-out "
              f"tokens{', the second halves in decode steps' if plan.mode == 'decode' else ''}"
              f"{'; K+1: ' + format(s['kl_by_k'][plan.k], '.4f') if len(s['kl_by_k']) > plan.k else ''})"
              + ("; online skipping in decode is not covered by the bound" if plan.online_enabled else ""))
    ranked = plan.selection.get("ranking", {})
    if ranked.get("by", "similarity") != "similarity":
        order = ", ".join(sublayer_name(j) for j in ranked["order"])
        probes = (f", {ranked['probes']} retrieval probes x {ranked['probe_tokens']} tokens, wrong answers first"
                  if ranked.get("probes") else "")
        print(f"selection: {ranked['by']} (greedy over the {ranked['tried']} most similar sublayers{probes}): "
              f"{order}")
    if plan.compensation is not None:
        print(f"stand-in: {plan.compensation.rule} (fitted on the calibration pass; the paper's is norm-ratio)")
    if plan.beta is not None and plan.online_enabled:
        print(f"online: W={plan.window}, beta={plan.beta:.5f} (FFNs with decode similarity >= beta join after W steps)")
    print(f"ideal speedup at {e['context_len']} tokens (FLOP model): prefill {e['prefill']:.3f}x, "
          f"decode {e['decode']:.3f}x over {e['decode_steps']} decode steps (before online skipping)")
    r = e["roofline"]
    print(f"ideal speedup at {e['context_len']} tokens (bytes+FLOPs roofline at "
          f"{r['machine']['bandwidth_gbs']:g} GB/s, {r['machine']['peak_gflops']:g} GFLOP/s, "
          f"{r['widths']['weights']:g} bytes per weight, {r['widths']['kv']:g} per KV element): prefill "
          f"{r['prefill']:.3f}x, decode {r['decode']:.3f}x")
    if a.backend == "trtllm-checkpoint":
        command = trtllm_build_command(report.output, world_size=a.tp_size * a.pp_size)
        print(f"build it where TensorRT-LLM is installed: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
