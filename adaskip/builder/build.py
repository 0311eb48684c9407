"""adaskip-build's work: load -> calibrate -> select -> write the engine directory (atomically)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adaskip import cost
from adaskip.calibrate import compensation as comp
from adaskip.calibrate import budget
from adaskip.calibrate.corpus import CalibrationOptions, load_calibration, load_heldout
from adaskip.calibrate.importance import cached_calibration, calibration_from_plan
from adaskip.calibrate.kv_scales import fit_on_calibration
from adaskip.calibrate.selection import greedy_order
from adaskip.calibrate.tasks import ANSWER_TOKENS, MIN_CONTEXT, prompt_is_chat
from adaskip.builder.options import COST_CONTEXT, DEFAULT_PROBE_TOKENS, BuildOptions
from adaskip.builder.plot import importance_plot
from adaskip.export.onnx.graph import build_onnx
from adaskip.export.onnx.ort import QUANTIZED_KV
from adaskip.export.onnx.quantize import BITS, quantize
from adaskip.export.onnx.save import save_onnx
from adaskip.export.onnx.variants import check_kv_cache, choose_variant
from adaskip.export.tensorrt.builder import TrtSettings, build_into, check_environment
from adaskip.export.trtllm.checkpoint import check_supported, write_checkpoint
from adaskip.engine_dir import (PLAN, TOKENIZER, WEIGHTS, atomic_dir, check_replaceable, save_tokenizer, save_weights,
                                write_manifest)
from adaskip.errors import InputError, PlanError
from adaskip.model import LoadedModel, load_model
from adaskip.layout import SkipLayout
from adaskip.model.tokenizer import eos_token_ids, load_tokenizer
from adaskip.plan import (SKIPDECODE_HORIZON, Calibration, SkipPlan, adaskip_plan, baseline_plan, now_utc,
                          rank_by_similarity)
from adaskip.runtime.decode_kernels import write_decode_graph
from adaskip.runtime.torch_engine import TorchEngine


@dataclass
class BuildReport:
    output: Path
    plan: SkipPlan
    expected: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _log(msg: str, opts: BuildOptions) -> None:
    if opts.progress:
        print(f"adaskip-build: {msg}", file=sys.stderr)


def make_plan(opts: BuildOptions, model: LoadedModel, tokenizer: Any) -> SkipPlan:
    spec, sel = model.spec, opts.selection
    if sel.plan is not None:
        plan = SkipPlan.load(sel.plan)
        plan.check_model(model.fingerprint, spec.num_layers)
        return plan
    if sel.method != "adaskip":
        return baseline_plan(sel.method, spec.num_layers, sel.skip, sel.mode, model.fingerprint, spec.name)
    if sel.skip is not None and sel.skip > spec.num_sublayers:
        raise PlanError(f"--skip must be between 0 and {spec.num_sublayers} (the model has {spec.num_sublayers} "
                        f"sublayers); got {sel.skip}")
    cal = calibration_for(opts, model, tokenizer)
    order, ranked_by = _selection_order(opts, model, tokenizer, cal)
    ranking = rank_by_similarity(cal.calib.similarity) if order is None else order
    if sel.max_kl is not None:
        k, selection = _k_for_max_kl(opts, model, tokenizer, cal, ranking)
    elif sel.alpha is not None:
        phases = {"prefill": ["prefill"], "decode": ["decode"], "e2e": ["prefill", "decode"]}[sel.mode]
        k = max(cost.k_for_alpha(spec, ranking, sel.alpha, sel.context_len, p) for p in phases)
        selection = {"rule": "alpha", "alpha": sel.alpha, "context_len": sel.context_len, "k": k}
    else:
        k = sel.skip
        selection = {"rule": "k", "k": k}
    return adaskip_plan(cal.calib, k, sel.mode, model.fingerprint, spec.name, window=sel.window, online=sel.online,
                        selection={**selection, "ranking": ranked_by}, order=order, scales=cal.scales,
                        compensation=cal.compensation)


def _selection_order(opts: BuildOptions, model: LoadedModel, tokenizer: Any, cal: Calibrated
                     ) -> tuple[list[int] | None, dict[str, Any]]:
    """The greedy order of --select kl / retrieval (None: the similarity ranking) and how it was chosen. With --skip
    K the greedy stops at K; --alpha and --max-kl pick K along the whole order (every candidate)."""
    sel, spec = opts.selection, model.spec
    if sel.select == "similarity":
        return None, {"by": "similarity"}
    recipe = sel.recipe()
    k_max = min(spec.num_sublayers, sel.skip if sel.skip is not None else recipe.candidates)
    tried = min(spec.num_sublayers, max(recipe.candidates, k_max))
    phase = comp.phase_of(sel.mode)
    chat = prompt_is_chat("auto", opts.model, tokenizer)
    what = (f"{recipe.probes} retrieval probes x {recipe.probe_tokens} tokens ({'chat' if chat else 'plain'} prompts, "
            f"wrong answers first) plus " if recipe.probes else "")
    window = min(recipe.window_tokens, len(cal.prompts[0]))
    _log(f"--select {sel.select}: greedy over the {tried} most similar sublayers, K up to {k_max}, scoring {what}the "
         f"next-token KL on {min(recipe.windows, len(cal.prompts))} calibration window(s) x {window} tokens"
         f"{', in decode steps after an unskipped prompt' if phase == 'decode' else ''}", opts)
    order = greedy_order(TorchEngine.from_loaded(model), tokenizer, cal.prompts, cal.calib.similarity,
                         cal.skip_scales(), cal.compensation, k_max, recipe, phase, chat, progress=opts.progress)
    return order, {"by": sel.select, **recipe.record(), "tried": tried, "phase": phase, "chat": chat, "order": order}


def _k_for_max_kl(opts: BuildOptions, model: LoadedModel, tokenizer: Any, cal: Calibrated, ranking: list[int]
                  ) -> tuple[int, dict[str, Any]]:
    """The largest K (along `ranking`, with the plan's stand-in) whose next-token KL on a held-out slice of the
    calibration source stays under --max-kl, and the selection record that says how it was chosen."""
    options = opts.calibration
    if options.reuse is not None:  # the stored statistics say how many prompts of which length they came from
        options = CalibrationOptions(prompts=cal.calib.num_prompts, tokens=cal.calib.prompt_tokens)
    tokens = min(budget.HELDOUT_TOKENS, options.tokens)
    heldout = load_heldout(tokenizer, options, budget.HELDOUT_WINDOWS, tokens)
    _log(f"--max-kl {opts.selection.max_kl}: next-token KL on {len(heldout.prompts)} held-out windows x {tokens} "
         f"tokens ({heldout.source}), K growing along the {opts.selection.select} ranking", opts)
    phase = comp.phase_of(opts.selection.mode)
    result = budget.largest_within_kl(TorchEngine.from_loaded(model), heldout.prompts, ranking, cal.skip_scales(),
                                      cal.compensation, opts.selection.max_kl, progress=opts.progress, phase=phase)
    if result.k == len(ranking) < model.spec.num_sublayers:
        _log(f"--max-kl: every one of the {len(ranking)} sublayers the greedy ranked stays under the bound (more "
             f"need a larger --select-candidates)", opts)
    selection = {"rule": "max-kl", "k": result.k, **result.record(),
                 "heldout": {"source": heldout.source, "digest": heldout.digest, "windows": len(heldout.prompts),
                             "tokens": tokens, "measure": budget.MEASURES[phase]}}
    return result.k, selection


@dataclass
class Calibrated:
    """An AdaSkip plan's inputs from the calibration: the statistics, the stand-in's scales / map (None: the
    paper's norm ratios), and the prompts the pass ran on (None when reused from a plan: no pass)."""

    calib: Calibration
    scales: Any = None
    compensation: Any = None
    prompts: list[list[int]] | None = None

    def skip_scales(self) -> list[float]:
        """Each sublayer's scalar stand-in scale: the fitted one, else the paper's norm ratio."""
        return list(self.calib.norm_ratio) if self.scales is None else self.scales


def calibration_for(opts: BuildOptions, model: LoadedModel, tokenizer: Any) -> Calibrated:
    """The statistics (and stand-in) for an AdaSkip plan: from an earlier plan (--calibration), from the cache,
    or from a pass on the fastest engine that gives the reference's statistics. A fitted stand-in needs the
    per-channel sums of a pass on the reference engine (cached beside its statistics)."""
    sel, cal = opts.selection, opts.calibration
    if cal.reuse is not None:
        _log(f"selecting from the statistics stored in {cal.reuse}", opts)
        return Calibrated(calibration_from_plan(cal.reuse, model.fingerprint))
    data = load_calibration(tokenizer, cal.prompts, cal.tokens, cal.data)
    if sel.stand_in != "norm-ratio":  # the same pass sums the per-channel statistics the stand-in is fitted on
        _log(f"calibration: {len(data.prompts)} prompts x {cal.tokens} tokens from {data.source} (torch, with the "
             f"per-channel sums of --stand-in {sel.stand_in})", opts)
        calib, stats, cached = comp.cached_collect(model, data, cal.cache, progress=opts.progress)
        if cached:
            _log("calibration and channel sums reused from the cache (--no-calib-cache to recompute)", opts)
        scales, compensation = comp.fit(sel.stand_in, stats, calib)
        return Calibrated(calib, scales, compensation, data.prompts)
    _log(f"calibration: {len(data.prompts)} prompts x {cal.tokens} tokens from {data.source}", opts)
    calib, engine, cached = cached_calibration(model, data, cal.engine, cal.cache, progress=opts.progress)
    if cached:
        _log(f"calibration reused from the cache (computed on {engine}; --no-calib-cache to recompute)", opts)
    return Calibrated(calib, prompts=data.prompts)


def _fit_kv_scales(opts: BuildOptions, model: LoadedModel, tokenizer: Any, layout: SkipLayout
                   ) -> tuple[Any, dict[str, Any]]:
    if not layout.cached_layers:  # every attention skipped: no cache to quantize
        return {}, {"prompts": 0, "rule": "no layer keeps a KV cache"}
    scales, record = fit_on_calibration(TorchEngine.from_loaded(model, layout.compensation), tokenizer,
                                        opts.calibration, layout)
    _log(f"{opts.engine.kv_dtype} KV cache: per-channel scales from the last {record['prompts']} calibration prompts "
         f"under {len(record['skip_sets'])} skip set(s)", opts)
    return scales, record


def build(opts: BuildOptions) -> BuildReport:
    """Build an engine directory. Fails before any heavy work on bad options; never leaves a partial output."""
    t0 = time.perf_counter()
    opts.validate()
    backend = opts.engine.backend
    output = Path(opts.output)
    output_state = check_replaceable(output, opts.force)  # before any heavy work; re-checked at publish
    if backend == "tensorrt":  # TensorRT present and able to build at --dtype: before loading the model
        check_environment(opts.engine.dtype)
    _log(f"loading {opts.model}", opts)
    model = load_model(opts.model, dtype=opts.engine.dtype)
    tokenizer = load_tokenizer(model)
    spec = model.spec
    check_kv_cache(spec, opts.engine.kv_dtype)  # the model alone can refuse --kv-dtype: before calibrating
    if opts.selection.context_len is None:  # resolved here, and recorded so in the manifest
        opts = replace(opts, selection=replace(opts.selection, context_len=min(COST_CONTEXT, spec.max_position_embeddings)))
    context_len = opts.selection.context_len
    if opts.selection.select == "retrieval" and opts.selection.probe_tokens is None:  # resolved and recorded so
        probe_tokens = max(MIN_CONTEXT, min(DEFAULT_PROBE_TOKENS, context_len,
                                            spec.max_position_embeddings - ANSWER_TOKENS))
        opts = replace(opts, selection=replace(opts.selection, probe_tokens=probe_tokens))
    for flag, value in (("--calib-tokens", opts.calibration.tokens), ("--context-len", context_len)):
        if value > spec.max_position_embeddings:
            raise InputError(f"{flag} {value} exceeds the model's context of {spec.max_position_embeddings} tokens")
    probe_tokens = opts.selection.probe_tokens
    if probe_tokens is not None and probe_tokens + ANSWER_TOKENS > spec.max_position_embeddings:
        raise InputError(f"--probe-tokens {probe_tokens} plus up to {ANSWER_TOKENS} answer tokens exceeds the model's "
                         f"context of {spec.max_position_embeddings} tokens")
    if backend == "trtllm-checkpoint":  # refuse an unsupported family or mapping before calibrating, not after
        check_supported(spec, model.weights)
        opts.engine.trtllm.validate(spec)
    if backend == "tensorrt":  # limits vs the model's context: before calibrating, not after
        trt_settings = TrtSettings.from_options(opts.engine.tensorrt, opts.engine.dtype,
                                                spec.max_position_embeddings, opts.progress)
    plan = make_plan(opts, model, tokenizer)
    # decode: over SkipDecode's horizon (where its growing set is fully grown; any other plan's is step-independent)
    layout = SkipLayout.from_plan(plan)
    check_kv_cache(spec, opts.engine.kv_dtype, layout)  # and the plan: before fitting KV scales and exporting
    expected = cost.speedups(spec, layout, context_len, SKIPDECODE_HORIZON)
    # next to it the bytes-and-FLOPs ideal at the engine's widths (decode is memory-bound)
    widths = cost.Widths.for_engine(opts.engine.dtype, BITS.get(opts.engine.quantize), opts.engine.kv_dtype)
    roofline = cost.roofline_speedups(spec, layout, context_len, SKIPDECODE_HORIZON, widths)
    expected["roofline"] = {k: roofline[k] for k in ("prefill", "decode", "machine", "widths")}
    plan.selection = {**plan.selection, "expected_speedup": expected}

    with atomic_dir(output, force=opts.force, expect=output_state) as tmp:
        _log(f"writing engine ({backend}) to {output}", opts)
        plan.save(tmp / PLAN)
        build_info = {"options": opts.record(), "created": now_utc(), "source": model.source}
        if backend == "torch":
            save_weights(tmp / WEIGHTS, model.weights, metadata={"fingerprint": model.fingerprint})
        elif backend == "trtllm-checkpoint":
            build_info["trtllm"] = write_checkpoint(tmp, spec, model.weights, plan, model.fingerprint,
                                                    opts.engine.trtllm)
            _log(f"TensorRT-LLM checkpoint: {build_info['trtllm']['conditionals']} conditional sublayers, no_op "
                 f"attention in layers {build_info['trtllm']['no_op']['attention'] or 'none'}", opts)
        else:
            variant = choose_variant(spec, layout, backend, opts.engine.graph_variant)
            kv_scales = None
            if opts.engine.kv_dtype in QUANTIZED_KV:
                kv_scales, build_info["kv_scales"] = _fit_kv_scales(opts, model, tokenizer, layout)
            graph = build_onnx(spec, model.weights, layout, variant=variant, kv_dtype=opts.engine.kv_dtype,
                               kv_scales=kv_scales)
            build_info["graph"] = save_onnx(graph, tmp)  # onnx.checker full check, both variants
            if opts.engine.quantize:
                _log(f"quantizing linear layers and the LM head to {opts.engine.quantize} (MatMulNBits)", opts)
                build_info["graph"].update(quantize(tmp, opts.engine.quantize))
            if backend == "ort" and variant == "ort":  # the graph the C++ runtime loads with the decode kernels
                write_decode_graph(tmp, build_info["graph"])
            _log(f"graph ({variant} variant): {build_info['graph']['conditionals']} conditional sublayers, KV for "
                 f"{len(build_info['graph']['kv_layers'])} of {spec.num_layers} layers"
                 + "; onnx.checker (full) passed", opts)
            if backend == "tensorrt":
                build_into(tmp, build_info, trt_settings, lambda msg: _log(msg, opts))
        save_tokenizer(tokenizer, tmp / TOKENIZER)
        importance_plot(plan, tmp / "importance.png")
        tok_info = {"dir": TOKENIZER, "eos_token_ids": eos_token_ids(model, tokenizer),
                    "chat_template": bool(getattr(tokenizer, "chat_template", None))}
        write_manifest(tmp, backend, spec, model.fingerprint, plan, build_info, tok_info)
    return BuildReport(output=output, plan=plan, expected=expected, seconds=time.perf_counter() - t0)
