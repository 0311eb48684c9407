"""adaskip-build's work: load -> calibrate -> select -> write the engine directory (atomically)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adaskip import cost
from adaskip.calibrate.importance import calibrate
from adaskip.calibrate.corpus import load_calibration
from adaskip.builder.options import COST_CONTEXT, BuildOptions
from adaskip.builder.plot import importance_plot
from adaskip.engine_dir import PLAN, TOKENIZER, WEIGHTS, atomic_dir, check_replaceable, write_manifest
from adaskip.errors import InputError, PlanError
from adaskip.model import LoadedModel, load_model
from adaskip.model.tokenizer import eos_token_ids, load_tokenizer
from adaskip.plan import SkipPlan, adaskip_plan, baseline_plan, now_utc, rank_by_similarity
from adaskip.policy import SkipPolicy
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
    spec, sel, cal = model.spec, opts.selection, opts.calibration
    if sel.plan is not None:
        plan = SkipPlan.load(sel.plan)
        plan.check_model(model.fingerprint, spec.num_layers)
        return plan
    if sel.method != "adaskip":
        return baseline_plan(sel.method, spec.num_layers, sel.skip, sel.mode, model.fingerprint, spec.name)
    if sel.skip is not None and sel.skip > spec.num_sublayers:
        raise PlanError(f"--skip must be between 0 and {spec.num_sublayers} (the model has {spec.num_sublayers} "
                        f"sublayers); got {sel.skip}")
    data = load_calibration(tokenizer, cal.prompts, cal.tokens, cal.data)
    _log(f"calibrating on {len(data.prompts)} prompts x {cal.tokens} tokens from {data.source}", opts)
    engine = TorchEngine.from_loaded(model)
    scales, compensation = None, None
    if sel.stand_in == "norm-ratio":
        calib = calibrate(engine, data, progress=opts.progress)
    else:  # the same pass also sums the per-channel statistics the stand-in is fitted on
        from adaskip.calibrate import compensation as comp

        calib, stats = comp.collect(engine, data, progress=opts.progress)
        scales, compensation = comp.fit(sel.stand_in, stats, calib)
    if sel.alpha is not None:
        ranking = rank_by_similarity(calib.similarity)
        phases = {"prefill": ["prefill"], "decode": ["decode"], "e2e": ["prefill", "decode"]}[sel.mode]
        k = max(cost.k_for_alpha(spec, ranking, sel.alpha, sel.context_len, p) for p in phases)
        selection = {"rule": "alpha", "alpha": sel.alpha, "context_len": sel.context_len, "k": k}
    else:
        k = sel.skip
        selection = {"rule": "k", "k": k}
    return adaskip_plan(calib, k, sel.mode, model.fingerprint, spec.name, window=sel.window, online=sel.online,
                        selection=selection, scales=scales, compensation=compensation)


def build(opts: BuildOptions) -> BuildReport:
    """Build an engine directory. Fails before any heavy work on bad options; never leaves a partial output."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    opts.validate()
    backend = opts.engine.backend
    output = Path(opts.output)
    check_replaceable(output, opts.force)  # before any heavy work
    if backend == "tensorrt":  # TensorRT present and able to build at --dtype: before loading the model
        from adaskip.export.tensorrt.builder import TrtSettings, check_environment

        check_environment(opts.engine.dtype)
    _log(f"loading {opts.model}", opts)
    model = load_model(opts.model, dtype=opts.engine.dtype)
    tokenizer = load_tokenizer(model)
    spec = model.spec
    if opts.selection.context_len is None:  # resolved here, and recorded so in the manifest
        opts = replace(opts, selection=replace(opts.selection, context_len=min(COST_CONTEXT, spec.max_position_embeddings)))
    context_len = opts.selection.context_len
    for flag, value in (("--calib-tokens", opts.calibration.tokens), ("--context-len", context_len)):
        if value > spec.max_position_embeddings:
            raise InputError(f"{flag} {value} exceeds the model's context of {spec.max_position_embeddings} tokens")
    if backend == "trtllm-checkpoint":  # refuse an unsupported family before calibrating, not after
        from adaskip.export.trtllm.checkpoint import check_supported

        check_supported(spec, model.weights)
    if backend == "tensorrt":  # limits vs the model's context: before calibrating, not after
        trt_settings = TrtSettings.from_options(opts.engine.tensorrt, opts.engine.dtype,
                                                spec.max_position_embeddings, opts.progress)
    plan = make_plan(opts, model, tokenizer)
    prefill_skipped = plan.skip if plan.mode in ("prefill", "e2e") else []
    expected = cost.speedups(spec, prefill_skipped, plan.skip, context_len)
    plan.selection = {**plan.selection, "expected_speedup": expected}

    with atomic_dir(output, force=opts.force) as tmp:
        _log(f"writing engine ({backend}) to {output}", opts)
        plan.save(tmp / PLAN)
        build_info = {"options": opts.record(), "created": now_utc(), "source": model.source}
        if backend == "torch":
            save_file(model.weights, str(tmp / WEIGHTS), metadata={"fingerprint": model.fingerprint})
        elif backend == "trtllm-checkpoint":
            from adaskip.export.trtllm.checkpoint import write_checkpoint

            build_info["trtllm"] = write_checkpoint(tmp, spec, model.weights, plan, model.fingerprint)
            _log(f"TensorRT-LLM checkpoint: {build_info['trtllm']['conditionals']} conditional sublayers, no_op "
                 f"attention in layers {build_info['trtllm']['no_op']['attention'] or 'none'}", opts)
        else:
            from adaskip.export.onnx.graph import build_onnx, ort_variant_supported, quantize_int4, save_onnx

            policy = SkipPolicy(plan)
            variant = opts.engine.graph_variant
            if variant == "auto":
                variant = "ort" if backend == "ort" and ort_variant_supported(spec, policy) else "portable"
            graph = build_onnx(spec, model.weights, policy, variant=variant)
            build_info["graph"] = save_onnx(graph, tmp)  # onnx.checker full check, both variants
            if opts.engine.quantize:
                _log("quantizing linear layers to int4 (MatMulNBits)", opts)
                build_info["graph"].update(quantize_int4(tmp))
            _log(f"graph ({variant} variant): {build_info['graph']['conditionals']} conditional sublayers, KV for "
                 f"{len(build_info['graph']['kv_layers'])} of {spec.num_layers} layers"
                 + "; onnx.checker (full) passed", opts)
            if backend == "tensorrt":
                from adaskip.export.tensorrt.builder import build_into

                build_into(tmp, build_info, trt_settings, lambda msg: _log(msg, opts))
        tokenizer.save_pretrained(str(tmp / TOKENIZER))
        importance_plot(plan, tmp / "importance.png")
        tok_info = {"dir": TOKENIZER, "eos_token_ids": eos_token_ids(model, tokenizer),
                    "chat_template": bool(getattr(tokenizer, "chat_template", None))}
        write_manifest(tmp, backend, spec, model.fingerprint, plan, build_info, tok_info)
    return BuildReport(output=output, plan=plan, expected=expected, seconds=time.perf_counter() - t0)
