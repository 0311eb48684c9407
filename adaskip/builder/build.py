"""adaskip-build's work: load -> calibrate -> select -> write the engine directory (atomically)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaskip import cost
from adaskip.calibrate.importance import calibrate
from adaskip.calibrate.corpus import load_calibration
from adaskip.builder.plot import importance_plot
from adaskip.engine_dir import (PLAN, TOKENIZER, WEIGHTS, atomic_dir, check_replaceable, save_tokenizer, save_weights,
                                write_manifest)
from adaskip.errors import InputError, ModelLoadError, PlanError
from adaskip.model import LoadedModel, load_model
from adaskip.model.tokenizer import eos_token_ids, load_tokenizer
from adaskip.plan import (COMPENSATION_RULES, DEFAULT_WINDOW, METHODS, MODES, SkipPlan, adaskip_plan, baseline_plan,
                          now_utc, rank_by_similarity)
from adaskip.policy import SkipPolicy
from adaskip.runtime.torch_engine import TorchEngine

BACKENDS = ("ort", "torch", "trtllm-checkpoint", "tensorrt")
# stand-ins for a skipped sublayer (adaskip/calibrate/compensation.py): the paper's scalar norm ratio, or one fitted on
# the calibration pass (per-token ratio, per-channel scale, per-channel affine a * h + b)
STAND_INS = COMPENSATION_RULES
# ort: ONNX graph on ONNX Runtime (default); torch: the reference engine
# trtllm-checkpoint: TensorRT-LLM checkpoint (config.json + rank0.safetensors) + model class for trtllm-build
# tensorrt: the portable ONNX graph built into a serialized TensorRT engine (adaskip/export/tensorrt/)


@dataclass
class BuildOptions:
    model: str
    output: str
    method: str = "adaskip"
    skip: int | None = None  # K sublayers (adaskip) or k layers (baselines)
    alpha: float | None = None  # target ideal speedup (adaskip)
    mode: str = "e2e"
    calib: str | None = None
    calib_prompts: int = 20
    calib_tokens: int = 2048
    context_len: int | None = None  # for the cost model; default min(4096, the model's context)
    window: int = DEFAULT_WINDOW
    online: bool = True
    stand_in: str = "norm-ratio"  # what replaces a skipped sublayer: the paper's rule or a fitted per-channel map
    plan: str | None = None  # reuse an existing plan instead of calibrating
    backend: str = "ort"
    dtype: str = "float32"
    quantize: str | None = None  # "int4": weight-only int4 MatMuls (ort backend)
    graph_variant: str = "auto"  # ort backend: "ort" (fused contrib ops), "portable" (standard ops), auto = ort if possible
    max_batch_size: int | None = None  # tensorrt backend: profile limits (trtllm-build's flags; tensorrt/profiles.py)
    max_input_len: int | None = None
    max_seq_len: int | None = None
    trt_profiles: str = "split"  # tensorrt: "split" (prefill + decode profiles) or "combined" (one)
    timing_cache: str | None = None  # tensorrt: timing cache file, reused across builds
    builder_opt_level: int | None = None  # tensorrt: builder optimization level (TensorRT's default when None)
    force: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.mode not in MODES:
            raise InputError(f"--mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise InputError(f"--backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.plan is not None:
            given = [f for f, v in (("--skip", self.skip), ("--alpha", self.alpha)) if v is not None]
            given += [f for f, v, d in (("--method", self.method, "adaskip"), ("--mode", self.mode, "e2e"),
                                         ("--window", self.window, DEFAULT_WINDOW), ("--calib", self.calib, None),
                                         ("--stand-in", self.stand_in, "norm-ratio"))
                      if v != d]
            if given:
                raise InputError(f"--plan fixes the selection; drop {', '.join(given)} (or drop --plan)")
        else:
            if (self.skip is None) == (self.alpha is None):
                raise InputError("give exactly one of --skip K or --alpha A (or --plan FILE)")
            if self.alpha is not None and self.method != "adaskip":
                raise InputError("--alpha selects AdaSkip sublayers; baselines take --skip k (whole layers)")
            if self.skip is not None and self.skip < 0:
                raise InputError(f"--skip must be >= 0; got {self.skip}")
        if self.stand_in not in STAND_INS:
            raise InputError(f"--stand-in must be one of {', '.join(STAND_INS)}; got {self.stand_in!r}")
        if self.stand_in != "norm-ratio" and self.method != "adaskip":
            raise InputError("--stand-in applies to AdaSkip plans; baselines skip whole layers with no stand-in")
        if self.stand_in != "norm-ratio" and self.backend == "trtllm-checkpoint":
            raise InputError("the TensorRT-LLM checkpoint supports the paper's norm-ratio stand-in only")
        if self.graph_variant not in ("auto", "ort", "portable"):
            raise InputError(f"--graph-variant must be auto, ort or portable; got {self.graph_variant!r}")
        if self.quantize is not None and (self.quantize != "int4" or self.backend != "ort"):
            raise InputError("--quantize int4 is available for the ort backend only")
        if self.window < 1:
            raise InputError(f"--window must be >= 1; got {self.window}")
        if self.context_len is not None and self.context_len < 1:
            raise InputError(f"--context-len must be >= 1; got {self.context_len}")
        from adaskip.export.tensorrt.builder import check_options  # TensorRT flags only with --backend tensorrt

        check_options(self)


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
    spec = model.spec
    if opts.plan is not None:
        plan = SkipPlan.load(opts.plan)
        plan.check_model(model.fingerprint, spec.num_layers)
        return plan
    if opts.method != "adaskip":
        return baseline_plan(opts.method, spec.num_layers, opts.skip, opts.mode, model.fingerprint, spec.name)
    if opts.skip is not None and opts.skip > spec.num_sublayers:
        raise PlanError(f"--skip must be between 0 and {spec.num_sublayers} (the model has {spec.num_sublayers} "
                        f"sublayers); got {opts.skip}")
    data = load_calibration(tokenizer, opts.calib_prompts, opts.calib_tokens, opts.calib)
    _log(f"calibrating on {len(data.prompts)} prompts x {opts.calib_tokens} tokens from {data.source}", opts)
    engine = TorchEngine.from_loaded(model)
    scales, compensation = None, None
    if opts.stand_in == "norm-ratio":
        calib = calibrate(engine, data, progress=opts.progress)
    else:  # the same pass also sums the per-channel statistics the stand-in is fitted on
        from adaskip.calibrate import compensation as comp

        calib, stats = comp.collect(engine, data, progress=opts.progress)
        scales, compensation = comp.fit(opts.stand_in, stats, calib)
    if opts.alpha is not None:
        ranking = rank_by_similarity(calib.similarity)
        phases = {"prefill": ["prefill"], "decode": ["decode"], "e2e": ["prefill", "decode"]}[opts.mode]
        k = max(cost.k_for_alpha(spec, ranking, opts.alpha, opts.context_len, p) for p in phases)
        selection = {"rule": "alpha", "alpha": opts.alpha, "context_len": opts.context_len, "k": k}
    else:
        k = opts.skip
        selection = {"rule": "k", "k": k}
    return adaskip_plan(calib, k, opts.mode, model.fingerprint, spec.name, window=opts.window, online=opts.online,
                        selection=selection, scales=scales, compensation=compensation)


def build(opts: BuildOptions) -> BuildReport:
    """Build an engine directory. Fails before any heavy work on bad options; never leaves a partial output."""
    t0 = time.perf_counter()
    opts.validate()
    output = Path(opts.output)
    output_state = check_replaceable(output, opts.force)  # before any heavy work; re-checked at publish
    _log(f"loading {opts.model}", opts)
    model = load_model(opts.model, dtype=opts.dtype)
    tokenizer = load_tokenizer(model)
    spec = model.spec
    if opts.context_len is None:
        opts.context_len = min(4096, spec.max_position_embeddings)
    for flag, value in (("--calib-tokens", opts.calib_tokens), ("--context-len", opts.context_len)):
        if value > spec.max_position_embeddings:
            raise InputError(f"{flag} {value} exceeds the model's context of {spec.max_position_embeddings} tokens")
    if opts.backend == "trtllm-checkpoint":  # refuse an unsupported family before calibrating, not after
        from adaskip.export.trtllm.checkpoint import check_supported

        check_supported(spec, model.weights)
    if opts.backend == "tensorrt":  # limits vs the model's context: before calibrating, not after
        from adaskip.export.tensorrt.builder import check_options

        check_options(opts, spec)
    plan = make_plan(opts, model, tokenizer)
    prefill_skipped = plan.skip if plan.mode in ("prefill", "e2e") else []
    expected = cost.speedups(spec, prefill_skipped, plan.skip, opts.context_len)
    plan.selection = {**plan.selection, "expected_speedup": expected}

    with atomic_dir(output, force=opts.force, expect=output_state) as tmp:
        _log(f"writing engine ({opts.backend}) to {output}", opts)
        plan.save(tmp / PLAN)
        build_info = {"options": {k: v for k, v in vars(opts).items() if k not in ("force", "progress", "output")},
                      "created": now_utc(), "source": model.source}
        if opts.backend == "torch":
            save_weights(tmp / WEIGHTS, model.weights, metadata={"fingerprint": model.fingerprint})
        elif opts.backend == "trtllm-checkpoint":
            from adaskip.export.trtllm.checkpoint import write_checkpoint

            build_info["trtllm"] = write_checkpoint(tmp, spec, model.weights, plan, model.fingerprint)
            _log(f"TensorRT-LLM checkpoint: {build_info['trtllm']['conditionals']} conditional sublayers, no_op "
                 f"attention in layers {build_info['trtllm']['no_op']['attention'] or 'none'}", opts)
        else:
            from adaskip.export.onnx.graph import build_onnx, ort_variant_supported, quantize_int4, save_onnx

            policy = SkipPolicy(plan)
            variant = opts.graph_variant
            if variant == "auto":
                variant = "ort" if opts.backend == "ort" and ort_variant_supported(spec, policy) else "portable"
            graph = build_onnx(spec, model.weights, policy, variant=variant)
            build_info["graph"] = save_onnx(graph, tmp)  # onnx.checker full check, both variants
            if opts.quantize:
                _log("quantizing linear layers to int4 (MatMulNBits)", opts)
                build_info["graph"].update(quantize_int4(tmp))
            _log(f"graph ({variant} variant): {build_info['graph']['conditionals']} conditional sublayers, KV for "
                 f"{len(build_info['graph']['kv_layers'])} of {spec.num_layers} layers"
                 + "; onnx.checker (full) passed", opts)
            if opts.backend == "tensorrt":
                from adaskip.export.tensorrt.builder import build_into

                build_into(tmp, build_info, opts, spec.max_position_embeddings, lambda msg: _log(msg, opts))
        save_tokenizer(tokenizer, tmp / TOKENIZER)
        importance_plot(plan, tmp / "importance.png")
        tok_info = {"dir": TOKENIZER, "eos_token_ids": eos_token_ids(model, tokenizer),
                    "chat_template": bool(getattr(tokenizer, "chat_template", None))}
        write_manifest(tmp, opts.backend, spec, model.fingerprint, plan, build_info, tok_info)
    return BuildReport(output=output, plan=plan, expected=expected, seconds=time.perf_counter() - t0)
