"""Build a serialized TensorRT engine from the portable ONNX graph (adaskip-build --backend tensorrt).

parse (If -> IIfConditional, IOSimilarity -> plugin) -> builder config (profiles, precision, optimization level,
timing cache, progress) -> build_serialized_network -> `model.engine` in the engine directory being written.

Precision: TensorRT for RTX builds strongly typed networks only (its API has no FP16/BF16 builder flags), so the
graph's types decide, and the exported graph is float32: --dtype float16/bfloat16 need the full `tensorrt`, where
they set the builder flags. float32 means IEEE fp32: TF32 is switched off so the engine reproduces the reference's
similarity statistics, which the online skip threshold compares at the third decimal.

Build time on CPU: TensorRT for RTX compiles the whole network once per optimization profile ("legacy CPU-only
mode"; one thread, no tactic timing). For SmolLM2-135M with the K=8 plan that was ~55 s for one profile and ~75 s
for the split pair on an otherwise quiet machine here (about 4x that while other jobs shared its 2 cores). It grows
with the network and its conditionals; the optimization level (0 vs 3), the shape ranges, the target compute
capability and the builder's thread count (1 vs 2) each changed it by 10% or less. `--profiles combined` builds one
profile.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from adaskip.errors import InputError
from adaskip.runtime.trt.lib import TensorRT, TensorRTError, errors_of, load_tensorrt, warnings_of
from adaskip.export.tensorrt.network import describe_network, input_axes, parse_onnx
from adaskip.export.tensorrt.options import TensorRTOptions
from adaskip.runtime.trt.plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from adaskip.runtime.trt.profiles import Limits, make_profiles
from adaskip.export.tensorrt.progress import make_monitor

ENGINE_FILE = "model.engine"


@dataclass
class TrtSettings:
    """TensorRTOptions resolved for one model: the limits filled in and checked against its context."""
    limits: Limits
    profiles: str = TensorRTOptions.profiles
    dtype: str = "float32"
    timing_cache: Path | None = None  # read before and written after the build (full TensorRT)
    opt_level: int | None = None  # builder optimization level 0..5; None: TensorRT's default (3)
    progress: bool = True

    @classmethod
    def from_options(cls, opts: TensorRTOptions, dtype: str, context: int, progress: bool = True) -> "TrtSettings":
        limits = Limits.resolve(opts.max_batch_size, opts.max_input_len, opts.max_seq_len, context)
        cache = Path(opts.timing_cache).expanduser() if opts.timing_cache else None
        return cls(limits, opts.profiles, dtype, cache, opts.builder_opt_level, progress)


def check_precision(env: TensorRT, dtype: str) -> None:
    """Whether this TensorRT can build at `dtype` (the dtype itself is checked with the other build options)."""
    if dtype != "float32" and not hasattr(env.trt.BuilderFlag, "FP16" if dtype == "float16" else "BF16"):
        raise InputError(f"--dtype {dtype}: {env.flavour} {env.version} builds strongly typed networks only (its "
                         f"API has no FP16/BF16 builder flags) and the exported graph is float32; build with --dtype "
                         f"float32, or install the full tensorrt package for reduced-precision engines")


def check_environment(dtype: str) -> None:
    """adaskip-build's early check for --backend tensorrt, before a model is loaded: TensorRT present, and able to
    build at `dtype`."""
    check_precision(load_tensorrt(), dtype)


def build_engine(onnx_path: Path, engine_path: Path, settings: TrtSettings) -> dict[str, Any]:
    """Parse, build and write the engine; returns what the manifest records. Raises TensorRTError with TensorRT's
    messages when the graph cannot be parsed or built (nothing is written then)."""
    env = load_tensorrt()
    check_precision(env, settings.dtype)
    trt = env.trt
    parsed = parse_onnx(env, onnx_path)
    network = describe_network(env, parsed.network)
    profiles = make_profiles(input_axes(onnx_path), settings.limits, settings.profiles)
    builder = parsed.builder
    with env.logger.capture() as messages:
        config = builder.create_builder_config()
        if settings.opt_level is not None:
            config.builder_optimization_level = settings.opt_level
        if hasattr(builder, "max_threads"):  # TensorRT's own compile threads (default 1)
            builder.max_threads = os.cpu_count() or 1
        precision = _precision(trt, config, settings.dtype)
        cache = _TimingCache(env, config, settings.timing_cache)
        accepted = []  # the profiles as TensorRT holds them (read back, not our request)
        for profile in profiles:
            p = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile.shapes.items():
                p.set_shape(name, lo, opt, hi)
            if config.add_optimization_profile(p) < 0:
                raise TensorRTError(f"TensorRT rejected the {profile.name} optimization profile: "
                                    + "; ".join(errors_of(messages) or ["(no message)"]))
            accepted.append({"name": profile.name, "shapes": {
                name: dict(zip(("min", "opt", "max"), ([int(d) for d in dims] for dims in p.get_shape(name))))
                for name in profile.shapes}})
        monitor = make_monitor(trt, settings.progress)
        config.progress_monitor = monitor
        t0 = time.perf_counter()
        try:
            with monitor.cancellable():
                serialized = builder.build_serialized_network(parsed.network, config)
        finally:
            monitor.close()
        seconds = time.perf_counter() - t0
    monitor.reraise()
    if serialized is None:
        raise TensorRTError(f"{env.flavour} {env.version} could not build an engine from {onnx_path.name}:\n  "
                            + "\n  ".join(errors_of(messages) or ["(no message)"]))
    with open(engine_path, "wb") as f:
        f.write(memoryview(serialized))
    return {
        **env.describe(),
        "engine": engine_path.name,
        "bytes": engine_path.stat().st_size,
        "build_seconds": round(seconds, 1),
        "limits": vars(settings.limits),
        "profile_mode": settings.profiles,
        "profiles": accepted,
        "precision": precision,
        "builder_optimization_level": config.builder_optimization_level,
        "timing_cache": cache.save(),
        "plugin": {"name": PLUGIN_NAME, "version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE,
                   "creator": parsed.plugin_creator, "override": parsed.plugin_override},
        "network": network,
        "phases": monitor.phases,
        "warnings": warnings_of(messages) + parsed.warnings,
    }


def _precision(trt: Any, config: Any, dtype: str) -> dict[str, Any]:
    if dtype == "float32":
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        return {"dtype": dtype, "flags": [], "tf32": False}
    flag = "FP16" if dtype == "float16" else "BF16"
    config.set_flag(getattr(trt.BuilderFlag, flag))
    return {"dtype": dtype, "flags": [flag], "tf32": bool(config.get_flag(trt.BuilderFlag.TF32))}


class _TimingCache:
    """--timing-cache FILE: loaded into the build, merged with what the build timed, written back (atomically).
    TensorRT for RTX has none (its timing-cache calls are no-ops: kernels are chosen when the engine first runs on
    a GPU), so there the file is neither read nor written and the manifest says so."""

    def __init__(self, env: TensorRT, config: Any, path: Path | None):
        self.path, self.cache, self.loaded = path, None, 0
        self.unsupported = env.is_rtx
        if path is None or self.unsupported:
            return
        data = path.read_bytes() if path.is_file() else b""
        self.loaded = len(data)
        self.cache = config.create_timing_cache(data)
        config.set_timing_cache(self.cache, True)  # ignore a mismatch (another GPU): start afresh instead

    def save(self) -> dict[str, Any] | None:
        if self.path is None:
            return None
        if self.unsupported:
            return {"path": str(self.path), "used": False,
                    "why": "TensorRT for RTX has no timing cache (it picks kernels on the GPU at run time)"}
        data = memoryview(self.cache.serialize())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        return {"path": str(self.path), "used": True, "loaded_bytes": self.loaded, "saved_bytes": len(data)}


def build_into(tmp: Path, build_info: dict[str, Any], settings: TrtSettings, log: Callable[[str], None]) -> None:
    """The tensorrt backend's step of adaskip-build, run inside the engine directory being written (after the
    portable graph was exported there): build model.engine, record it, drop the ONNX files it was built from."""
    graph = build_info["graph"]
    log(f"building the TensorRT engine ({settings.profiles} profiles: batch <= {settings.limits.max_batch_size}, "
        f"input <= {settings.limits.max_input_len}, sequence <= {settings.limits.max_seq_len})")
    info = build_engine(tmp / graph["file"], tmp / ENGINE_FILE, settings)
    net = info["network"]
    log(f"{info['flavour']} {info['version']}: {len(net['conditionals']['sublayers'])} sublayer conditionals, "
        f"{sum(net['plugins']['layers'].values())} IOSimilarity plugin layers, KV inputs for "
        f"{len(net['kv_layers'])} layers; engine built in {info['build_seconds']:.0f} s")
    if info["timing_cache"] and not info["timing_cache"]["used"]:
        log(f"--timing-cache ignored: {info['timing_cache']['why']}")
    for name in (graph["file"], graph["data"]):  # the engine carries the weights; the graph was its source only
        (tmp / name).unlink(missing_ok=True)
    build_info["graph"] = {**graph, "kept": False}
    build_info["tensorrt"] = info
