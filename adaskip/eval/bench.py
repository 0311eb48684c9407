"""adaskip-bench: time to first token and per-token decode time, side by side, at several context lengths.

Columns: Hugging Face transformers (sdpa), the reference torch engine, our ONNX Runtime engine with nothing skipped,
the same engine with AdaSkip e2e plans at the given budgets, onnxruntime-genai fp32 (and int4 next to our
`--quantize int4` engine) and llama.cpp (f32, q8_0, q4_0 GGUFs converted from the same weights) on the same model.
Every repeat runs every column once, in a rotating order, on the same real-text prompt ids, so slow drifts of a
shared machine hit all columns alike; we report medians and ratios against our unskipped ORT engine, with two ideal
speedups beside each AdaSkip column: the FLOPs the plan removes, and the bytes-and-FLOPs (roofline) ideal of
adaskip/cost.py, which is what a memory-bound decode step can gain.
Run with OMP_WAIT_POLICY=PASSIVE; every ONNX Runtime session has intra-op spinning off except the `-spin`
columns (ours and onnxruntime-genai's, fp32 and with --int4 int4, with spinning on, as onnxruntime-genai runs by
default); llama.cpp runs in worker
processes without that variable, with OpenMP's default wait policy, as its users run it (adaskip/eval/llamacpp.py).
With --decode-kernels, `-dk` twins of our unskipped engines run their decode attention on cpp/ortops's kernel
(adaskip/runtime/decode_kernels.py); every other column of ours runs ONNX Runtime's kernels only.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from adaskip import cost
from adaskip.calibrate.corpus import CalibrationOptions, builtin_text, load_calibration
from adaskip.calibrate.importance import cached_calibration
from adaskip.calibrate.kv_scales import fit_on_calibration
from adaskip.engine_dir import PLAN, TOKENIZER, save_tokenizer, write_manifest
from adaskip.errors import InputError, check_choice
from adaskip.eval import cpp_runtime, llamacpp
from adaskip.export.onnx.graph import build_onnx
from adaskip.export.onnx.quantize import element_bytes, initializer_bytes, quantize_int4
from adaskip.export.onnx.save import save_onnx
from adaskip.export.onnx.variants import check_kv_cache, choose_variant, gqa_supports
from adaskip.layout import SkipLayout
from adaskip.model import load_model
from adaskip.model.tokenizer import eos_token_ids, load_tokenizer
from adaskip.plan import SkipPlan, adaskip_plan, baseline_plan, sublayer_name
from adaskip.policy import SkipPolicy
from adaskip.runtime.decode_kernels import kernel_library, write_decode_graph
from adaskip.runtime.generate import Generator, SamplingParams
from adaskip.runtime.ort_engines import PREFILL_CHUNK, session_options
from adaskip.runtime.registry import engine_class
from adaskip.runtime.torch_engine import TorchEngine


ROOFLINE_WIDTHS = cost.Widths.for_engine("float32")  # the AdaSkip columns are fp32 engines


@dataclass
class BenchOptions:
    """What adaskip-bench measures (adaskip/cli/bench.py fills it from its flags)."""
    model: str = "smollm2-135m"
    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8128])  # each + decode_tokens must fit
    budgets: list[int] = field(default_factory=lambda: [8, 16])  # AdaSkip K values (e2e plans); [] for none
    repeats: int = 3
    decode_tokens: int = 32
    threads: int = 2
    calibration: str | None = None  # a plan.json whose calibration stats to take instead of calibrating
    calib_prompts: int = CalibrationOptions.prompts  # as adaskip-build calibrates by default
    calib_tokens: int = CalibrationOptions.tokens
    int4: bool = False  # int4 columns (ours and onnxruntime-genai)
    int8_kv: bool = False  # our engines again with an int8 KV cache (ort-kv8, and ort-int4-kv8 with int4)
    fp16_kv: bool = False  # with decode_kernels: ort-kv16-dk (and its -spin twin), a float16 KV cache on the kernels
    # (llama.cpp's default cache type); ONNX Runtime's own CPU kernel converts such a cache every step
    hf: bool = True  # the Hugging Face transformers column
    genai: bool = True  # the onnxruntime-genai columns
    spinning_pair: bool = True  # ort-spin and ort-genai-fp32-spin, with int4 also ort-int4-spin and
    # ort-genai-int4-spin (each engine with intra-op spinning on, as onnxruntime-genai and llama.cpp run by default)
    llamacpp: bool = True  # the llama.cpp columns (when llama-cpp-python is installed)
    llamacpp_types: list[str] = field(default_factory=lambda: list(llamacpp.GGUF_TYPES))
    llamacpp_convert: str | None = None  # llama.cpp's convert_hf_to_gguf.py (default: the installed version's sdist's)
    cpp_runtime: str | None = None  # cpp/runtime's adaskip_generate: -cpp twins of our non-AdaSkip engine columns
    decode_kernels: str | None = None  # cpp/ortops's library: -dk twins of ort (and ort-int4) with its decode kernels

    def validate(self) -> None:
        if self.repeats < 1 or self.decode_tokens < 1 or self.threads < 1:
            raise InputError("--repeats, --decode-tokens and --threads must be >= 1")
        if not self.contexts or min(self.contexts) < 1:
            raise InputError("--contexts must be one or more positive token counts")
        if self.budgets and min(self.budgets) < 0:
            raise InputError("--budgets must be non-negative integers (sublayers)")
        for t in self.llamacpp_types:
            check_choice(t, llamacpp.GGUF_TYPES, "--llamacpp-types")
        if self.llamacpp_convert is not None and not Path(self.llamacpp_convert).expanduser().is_file():
            raise InputError(f"--llamacpp-convert {self.llamacpp_convert}: no such file "
                             "(llama.cpp's convert_hf_to_gguf.py)")
        if self.cpp_runtime is not None:
            cpp_runtime.check_program(self.cpp_runtime)
        if self.decode_kernels is not None:
            kernel_library(self.decode_kernels)
        elif self.fp16_kv:
            raise InputError("--fp16-kv times a float16 KV cache on the decode kernels: add --decode-kernels LIB "
                             "(ONNX Runtime's own CPU kernel converts such a cache every step)")
        if (self.budgets and self.calibration is None) or self.int8_kv:  # calibration prompts are read: AdaSkip
            # columns calibrate as adaskip-build does, the int8 KV columns fit their scales on them
            CalibrationOptions(prompts=self.calib_prompts, tokens=self.calib_tokens).validate()


@dataclass
class Column:
    name: str
    run: Callable[[list[int], int], tuple[float, float]]  # (prompt, decode tokens) -> (TTFT s, s per token)
    ideal: dict[int, dict[str, float]] = field(default_factory=dict)  # context -> {"prefill": x, "decode": x}
    note: str = ""
    skipped: list[int] = field(default_factory=list)  # sublayers its plan removes (for its prefill FLOPs)
    last_token_tail: bool = True  # runs a prefill's tail for the last token only (our engines; not HF, not genai)
    info: dict[str, Any] = field(default_factory=dict)  # what the engine is (versions, build), for the record
    close: Callable[[], None] | None = None  # releases what it holds (a worker process)
    decode_bytes: Callable[[int], float] | None = None  # context -> bytes one decode step reads (its memory floor)
    layout: SkipLayout | None = None  # an AdaSkip column's plan (its ideals need the measured machine)


def _generator_column(name: str, engine: Any, policy: Any, note: str = "") -> Column:
    gen = Generator(engine, policy)  # no tokenizer: time the engine and the policy, not detokenization

    def run(prompt: list[int], steps: int) -> tuple[float, float]:
        r = gen.generate([prompt], SamplingParams(max_new_tokens=steps + 1, stop_token_ids=()))[0]
        return r.ttft_s, r.decode_s / steps

    return Column(name, run, note=note)


def _hf_column(path: str) -> Column:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                 trust_remote_code=False).eval()

    @torch.inference_mode()
    def run(prompt: list[int], steps: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        past = out.past_key_values
        for _ in range(steps):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return t1 - t0, (time.perf_counter() - t1) / steps

    return Column("transformers", run, note="sdpa, fp32", last_token_tail=False)


def _genai_build(hf_dir: str, precision: str, work: Path) -> Path | None:
    """onnxruntime-genai's own model builder on the same Hugging Face checkpoint (its CPU defaults)."""
    out = work / f"genai-{precision}"
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf_dir, "-o", str(out),
                           "-p", precision, "-e", "cpu"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"adaskip-bench: onnxruntime-genai {precision} build failed: {proc.stderr.strip()[-300:]}",
              file=sys.stderr)
        return None
    return out


def _stored_model_bytes(spec: Any, weights: float, kv_width: float) -> Callable[[int], float]:
    """Another engine's decode-step bytes at a context: its stored weights read once, plus every layer's KV cache
    over the context at `kv_width` bytes per element (the anchors skip nothing)."""
    return lambda context: weights + sum(cost.kv_bytes(spec, i, context, 1, kv_width) for i in range(spec.num_layers))


def _onnx_decode_weights(path: Path) -> tuple[float, float]:
    """(bytes of the initializers a decode step reads, bytes per KV element) of another builder's ONNX model: every
    initializer except those only gathered from (an embedding table: one row per token), and the element width of
    its `past_key_values.*` inputs. Read from the graph's metadata, not its weights."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    gathered = {n.input[0] for n in m.graph.node if n.op_type == "Gather"}
    used_otherwise = {i for n in m.graph.node if n.op_type != "Gather" for i in n.input}
    weights = 0.0
    for init in m.graph.initializer:
        if init.name in gathered and init.name not in used_otherwise:
            continue
        weights += initializer_bytes(init)
    kv_types = {i.type.tensor_type.elem_type for i in m.graph.input if i.name.startswith("past_key_values")}
    return weights, element_bytes(kv_types.pop()) if len(kv_types) == 1 else 4.0


def _genai_column(built: Path, name: str, threads: int, spinning: bool, spec: Any) -> Column:
    """One onnxruntime-genai model over a built folder. Its genai_config.json passes unknown session_options keys to
    ONNX Runtime as config entries, so spinning is set the same way as in our sessions; each setting gets its own
    folder (links to the built files, its own config) because a model reads the config of its folder."""
    import onnxruntime_genai as og

    folder = built.parent / name
    folder.mkdir()
    for f in built.iterdir():
        if f.name != "genai_config.json":
            (folder / f.name).symlink_to(f.resolve())
    cfg = json.loads((built / "genai_config.json").read_text())
    cfg["model"]["decoder"]["session_options"].update({
        "intra_op_num_threads": threads, "inter_op_num_threads": 1,
        "session.intra_op.allow_spinning": "1" if spinning else "0"})
    (folder / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    model = og.Model(str(folder))

    def run(prompt: list[int], steps: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + steps + 1, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))  # computes the prompt's logits
        gen.generate_next_token()  # samples the first token from them: no forward pass, not a decode step
        t1 = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
        return t1 - t0, (time.perf_counter() - t1) / steps

    weights, kv_width = _onnx_decode_weights(folder / cfg["model"]["decoder"]["filename"])
    return Column(name, run, note="GroupQueryAttention, shared KV buffer (its builder's defaults); "
                  + ("intra-op spinning on, its default" if spinning else "intra-op spinning off, as ours"),
                  last_token_tail=False, decode_bytes=_stored_model_bytes(spec, weights, kv_width))


def _genai_columns(hf_dir: str, precision: str, work: Path, threads: int, with_spinning: bool,
                   spec: Any) -> list[Column]:
    """onnxruntime-genai at `precision` with spinning off (like our sessions) and, if asked, on (its default)."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") is None:
        return []
    built = _genai_build(hf_dir, precision, work)
    if built is None:
        return []
    name = f"ort-genai-{precision}"
    return [_genai_column(built, name, threads, spinning=False, spec=spec)] + (
        [_genai_column(built, f"{name}-spin", threads, spinning=True, spec=spec)] if with_spinning else [])


def _add_llamacpp_columns(columns: list[Column], opts: BenchOptions, hf_dir: str, spec: Any, n_ctx: int,
                          work: Path) -> None:
    """llama.cpp on GGUFs of the same weights, one worker process per GGUF type (adaskip/eval/llamacpp.py), each
    added to `columns` as soon as it runs (so that it is closed whatever happens next)."""
    ggufs = llamacpp.make_ggufs(hf_dir, opts.llamacpp_types, work, llamacpp.converter(opts.llamacpp_convert),
                                opts.threads)
    for t, path in ggufs.items():
        worker = llamacpp.Worker(path, opts.threads, n_ctx)
        info = worker.info
        # every tensor of the GGUF (llama_model_size), each read once per token: exact for a tied embedding (the
        # table is the LM head), the embedding table too many for an untied one; the KV cache in its type
        weights, kv_width = float(info["weight_bytes"]), {"f16": 2.0, "f32": 4.0}[info["kv_cache"]]
        columns.append(Column(
            f"llama.cpp-{t}", worker.run, close=worker.close, last_token_tail=False, info=info,
            decode_bytes=_stored_model_bytes(spec, weights, kv_width),
            note=(f"llama-cpp-python {info['llama_cpp_python']}, ggml {info['ggml']}; {t} GGUF by llama.cpp's "
                  "converter" + ("" if t == "f32" else " and quantizer") + f"; {info['kv_cache']} KV cache, flash attention "
                  f"{'on' if info['flash_attn'] else 'off'}, batch {info['n_batch']}/{info['n_ubatch']}; OpenMP wait "
                  f"policy {info['omp_wait_policy']}")))


@dataclass
class CppTwin:
    """What an engine column needs to run a second time in the C++ runtime: its program and the tokenizer that
    completes an engine dir (the runtime reads only its end-of-sequence ids; the bench sends none)."""
    program: Path
    tokenizer: Any


def _ort_column(name: str, model: Any, plan: Any, work: Path, threads: int, quantize: bool = False,
                spinning: bool = False, cpp: CppTwin | None = None, kv_dtype: str = "float32",
                kv_scales: Any = None, decode_kernels: str = "") -> list[Column]:
    """Our engine on `plan` in the Python Generator, and with `cpp` the same engine dir in the C++ runtime's loop
    too (column `<name>-cpp`); its KV cache in `kv_dtype` (int8 with `kv_scales`); with `decode_kernels` (a
    cpp/ortops library) its decode steps run that library's attention kernel. Without it ONNX Runtime's own kernels
    run, whatever ADASKIP_DECODE_KERNELS says."""
    out = work / name
    out.mkdir()
    policy = SkipPolicy(plan)
    variant = choose_variant(model.spec, policy.layout, "ort")  # what adaskip-build picks for --backend ort
    graph_info = save_onnx(build_onnx(model.spec, model.weights, policy.layout, variant=variant, kv_dtype=kv_dtype,
                                      kv_scales=kv_scales), out, check=False)
    widths = cost.Widths.for_engine("float32", kv_dtype=kv_dtype)
    if quantize:
        q = quantize_int4(out)
        graph_info.update(q)
        widths = cost.Widths.for_engine("float32", bits=q["bits"], kv_dtype=kv_dtype, block_size=q["block_size"])
    engine_cls = engine_class("ort", variant)
    kernels = {"decode_kernels": decode_kernels} if variant == "ort" else {}  # the portable graph has no such option
    col = _generator_column(name, engine_cls(out / "model.onnx", model.spec, threads=threads, spinning=spinning,
                                             **kernels),
                            policy, note=f"{variant} graph" + ("; intra-op spinning on, like the ort-genai-*-spin "
                                                                "columns" if spinning else "")
                            + ("" if kv_dtype == "float32" else f"; {kv_dtype} KV cache (adaskip-build --kv-dtype "
                                                                f"{kv_dtype})")
                            + ("; decode attention on cpp/ortops's DecodeGroupQueryAttention" if decode_kernels
                               else ""))
    skipped = sorted(policy.layout.decode_skip_at(1))  # e2e plans here: one decode set
    col.decode_bytes = lambda c: cost.decode_step_bytes(model.spec, c, skipped, widths)
    if cpp is None:
        return [col]
    # the graph made an engine dir the C++ runtime opens, as adaskip-build writes one: plan, tokenizer, manifest
    # (and the decode kernels' graph, which the C++ runtime loads with them)
    if decode_kernels:
        write_decode_graph(out, graph_info)
    plan.save(out / PLAN)
    save_tokenizer(cpp.tokenizer, out / TOKENIZER)
    write_manifest(out, "ort", model.spec, model.fingerprint, plan, {"graph": graph_info, "source": model.source},
                   {"dir": TOKENIZER, "eos_token_ids": eos_token_ids(model, cpp.tokenizer)})
    worker = cpp_runtime.Worker(cpp.program, out, threads, spinning, decode_kernels)
    twin = Column(f"{name}-cpp", worker.run, close=worker.close, decode_bytes=col.decode_bytes,
                  info={"program": str(cpp.program.resolve())},
                  note=f"{col.note}; the same engine dir in the C++ runtime's loop (adaskip_generate --jsonl)")
    return [col, twin]


def _decode_kernel_columns(opts: BenchOptions, model: Any, nothing: Any, work: Path, skipped: dict[str, str],
                           quantize: bool, cpp: CppTwin | None = None, kv_dtype: str = "float32") -> list[Column]:
    """ort-dk (ort-int4-dk with `quantize`, ort-kv16-dk with a float16 `kv_dtype`), and its -spin twin with the
    spinning pair: the same engine with cpp/ortops's decode kernels (--decode-kernels); with `cpp` their C++ runtime
    twins too."""
    if opts.decode_kernels is None:
        return []
    base = ("ort-int4" if quantize else "ort") + ("-kv16" if kv_dtype == "float16" else "")
    if choose_variant(model.spec, SkipPolicy(nothing).layout, "ort") != "ort":
        skipped[f"{base}-dk"] = "the decode kernels replace GroupQueryAttention, which this model's graph cannot use"
        return []
    columns = _ort_column(f"{base}-dk", model, nothing, work, opts.threads, quantize=quantize, cpp=cpp,
                          kv_dtype=kv_dtype, decode_kernels=opts.decode_kernels)
    if opts.spinning_pair:
        columns += _ort_column(f"{base}-dk-spin", model, nothing, work, opts.threads, quantize=quantize,
                               spinning=True, cpp=cpp, kv_dtype=kv_dtype, decode_kernels=opts.decode_kernels)
    return columns


def _int8_kv_columns(opts: BenchOptions, model: Any, tokenizer: Any, nothing: Any, work: Path, cpp: CppTwin | None,
                     skipped: dict[str, str]) -> list[Column]:
    """ort-kv8 (and with --int4 ort-int4-kv8, and their C++ twins): our engines with an int8 KV cache, its scales
    fitted as adaskip-build --kv-dtype int8 fits them; none, with the reason in `skipped`, where the model cannot."""
    try:
        check_kv_cache(model.spec, "int8", SkipPolicy(nothing).layout)
    except InputError as e:
        skipped["int8 KV cache"] = str(e)
        return []
    kv_scales, fitted = fit_on_calibration(TorchEngine.from_loaded(model), tokenizer,
                                           CalibrationOptions(prompts=opts.calib_prompts, tokens=opts.calib_tokens))
    columns: list[Column] = []
    for name, quantized in (("ort-kv8", False),) + ((("ort-int4-kv8", True),) if opts.int4 else ()):
        columns += _ort_column(name, model, nothing, work, opts.threads, quantize=quantized, cpp=cpp,
                               kv_dtype="int8", kv_scales=kv_scales)
    for col in columns:
        col.info["kv_scales"] = fitted
    return columns


def _probe_session(model: Any, threads: int) -> Any:
    """An ONNX Runtime session for one of the machine probes below: spinning off whatever ADASKIP_SPINNING says,
    as every column's session is unless it says otherwise."""
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), session_options(threads, spinning=False),
                                providers=["CPUExecutionProvider"])


def _gemm_gflops(spec: Any, threads: int, rows: int = 2048, repeats: int = 7) -> float:
    """This machine's fp32 GEMM throughput as ONNX Runtime gets it (one MatMul of the model's FFN shape, best of
    `repeats`): the roofline a compute-bound prefill can approach."""
    from onnx import TensorProto, helper, numpy_helper

    d, f = spec.hidden_size, spec.intermediate_size
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((d, f)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, f])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = _probe_session(model, threads)
    x = np.random.default_rng(1).standard_normal((rows, d)).astype(np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        best = min(best, time.perf_counter() - t0)
    return 2.0 * rows * d * f / best / 1e9


def read_bandwidth_gbs(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
    """This machine's memory read bandwidth (GB/s), the best of two streaming reads of a matrix far larger than any
    cache: ONNX Runtime's matrix-vector product (the kernel a decode step spends its time in) and torch's sum, both
    at `threads` threads, best of `repeats`. The memory floor of a decode step is its bytes over this."""
    from onnx import TensorProto, helper

    cols = megabytes * 2**20 // 4 // 1024
    w = np.random.default_rng(0).standard_normal((1024, cols), dtype=np.float32)
    # the matrix is fed, not stored in the graph: no 256 MB model to serialize on every call
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [1024, cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])])
    sess = _probe_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), threads)
    feeds = {"x": np.ones((1, 1024), np.float32), "w": w}
    flat = torch.from_numpy(w)
    best = float("inf")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(repeats):
            for read in (lambda: sess.run(None, feeds), flat.sum):
                t0 = time.perf_counter()
                read()
                best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(torch_threads)
    return w.nbytes / best / 1e9


def _gemv_gbs(spec: Any, threads: int, repeats: int = 3) -> float:
    """ONNX Runtime's fp32 matrix-vector rate (GB/s) at this model's hidden size: one row times a [hidden, N] matrix
    of 256 MB, stored in the graph as an engine's weights are (prepacked at load), best of `repeats`. Most of an fp32
    decode step's bytes go through this kernel at this shape, so decode time / (bytes / this rate) says how much of a
    step's gap to the memory floor is the kernel's and how much the rest of the graph's."""
    sess, feeds, nbytes = _gemv_session(spec.hidden_size, threads)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


@functools.lru_cache(maxsize=1)
def _gemv_session(hidden: int, threads: int, megabytes: int = 256) -> tuple[Any, dict[str, np.ndarray], int]:
    """The product _gemv_gbs times, built and prepacked once per run (a few seconds each time otherwise)."""
    from onnx import TensorProto, helper, numpy_helper

    n = megabytes * 2**20 // 4 // hidden
    w = np.random.default_rng(0).standard_normal((hidden, n), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(w, "w")])
    sess = _probe_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), threads)
    feeds = {"x": np.ones((1, hidden), np.float32)}
    sess.run(None, feeds)  # the first run allocates
    return sess, feeds, w.nbytes


def _attention_gflops(spec: Any, threads: int, context: int, repeats: int = 3) -> float | None:
    """ONNX Runtime's GroupQueryAttention alone over a causal prompt of `context` tokens with the model's head shape,
    in the engine's prefill chunks (best of `repeats`): the attention kernel's throughput, the other half of the
    prefill roofline. None where the model's graph cannot use the kernel."""
    from onnx import TensorProto, helper

    if not gqa_supports(spec):
        return None
    heads, kvh, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    ins = [helper.make_tensor_value_info("qkv", f32, [1, "s", (heads + 2 * kvh) * hd]),
           helper.make_tensor_value_info("past_key", f32, [1, kvh, context, hd]),
           helper.make_tensor_value_info("past_value", f32, [1, kvh, context, hd]),
           helper.make_tensor_value_info("seqlens_k", i32, [1]), helper.make_tensor_value_info("total", i32, []),
           helper.make_tensor_value_info("cos", f32, [context, hd // 2]),
           helper.make_tensor_value_info("sin", f32, [context, hd // 2]),
           helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "s"])]
    outs = [helper.make_tensor_value_info(n, f32, None) for n in ("out", "present_key", "present_value")]
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos",
                                                    "sin", "position_ids"], [o.name for o in outs],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=kvh, do_rotary=1)
    model = helper.make_model(helper.make_graph([node], "attention", ins, outs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = _probe_session(model, threads)
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((1, context, (heads + 2 * kvh) * hd)).astype(np.float32)
    angles = np.arange(context)[:, None] * np.geomspace(1.0, 1e-4, hd // 2)[None]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    best = float("inf")
    for rep in range(repeats + 1):  # the first run warms the session up and is not counted
        kv = [np.zeros((1, kvh, context, hd), np.float32) for _ in range(2)]
        t0 = time.perf_counter()
        for start in range(0, context, PREFILL_CHUNK):
            n = min(PREFILL_CHUNK, context - start)
            binding = sess.io_binding()
            feeds = {"qkv": qkv[:, start:start + n], "past_key": kv[0], "past_value": kv[1],
                     "seqlens_k": np.array([start + n - 1], np.int32), "total": np.array(start + n, np.int32),
                     "cos": cos, "sin": sin, "position_ids": np.arange(start, start + n)[None]}
            for name, value in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            binding.bind_output("out", "cpu")
            for name, buf in (("present_key", kv[0]), ("present_value", kv[1])):  # in place, as in the engine
                binding.bind_output(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            sess.run_with_iobinding(binding)
        best = min(best, time.perf_counter() - t0) if rep else best
    return 4 * heads * hd * (context * (context + 1) // 2) / best / 1e9


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    opts.validate()
    torch.set_num_threads(opts.threads)
    model = load_model(opts.model)
    spec = model.spec
    contexts = opts.contexts
    if max(contexts) + opts.decode_tokens + 1 > spec.max_position_embeddings:
        raise InputError(f"contexts must leave room for {opts.decode_tokens} decode tokens within "
                         f"{spec.max_position_embeddings}")
    budgets_calibrate = bool(opts.budgets) and opts.calibration is None  # AdaSkip columns without --calibration
    if (budgets_calibrate or opts.int8_kv) and opts.calib_tokens > spec.max_position_embeddings:
        raise InputError(f"--calib-tokens {opts.calib_tokens} exceeds the model's context of "
                         f"{spec.max_position_embeddings} tokens")
    tokenizer = load_tokenizer(model)
    corpus = tokenizer.encode(builtin_text(), add_special_tokens=False)
    budgets = opts.budgets
    calib = None  # only AdaSkip columns need one
    if opts.calibration:
        source_plan = SkipPlan.load(opts.calibration)
        source_plan.check_model(model.fingerprint, spec.num_layers)
        calib = source_plan.calibration
    elif budgets_calibrate:  # the same pass and cache as adaskip-build's
        data = load_calibration(tokenizer, opts.calib_prompts, opts.calib_tokens)
        calib = cached_calibration(model, data, threads=opts.threads)[0]
    nothing = baseline_plan("early-exit", spec.num_layers, 0, "e2e", model.fingerprint)
    work = Path(tempfile.mkdtemp(prefix="adaskip-bench-"))
    columns: list[Column] = []
    try:
        return _measure(opts, model, tokenizer, calib, nothing, budgets, contexts, corpus, work, columns)
    finally:
        for col in columns:
            if col.close is not None:
                col.close()
        shutil.rmtree(work, ignore_errors=True)  # the exported graphs: several copies of the weights


def _measure(opts: BenchOptions, model, tokenizer, calib, nothing, budgets, contexts, corpus, work: Path,
             columns: list[Column]) -> dict[str, Any]:
    """Fills `columns` (the caller closes them), runs them and returns the record."""
    spec = model.spec
    skipped: dict[str, str] = {}  # anchors asked for that cannot run here, and why
    if opts.hf:
        columns.append(_hf_column(model.source))
    columns.append(_generator_column("torch-reference", TorchEngine.from_loaded(model), SkipPolicy(nothing)))
    cpp = None if opts.cpp_runtime is None else CppTwin(cpp_runtime.check_program(opts.cpp_runtime), tokenizer)
    columns += _ort_column("ort", model, nothing, work, opts.threads, cpp=cpp)
    if opts.spinning_pair:  # onnxruntime-genai spins by default: both engines with spinning on, side by side
        columns += _ort_column("ort-spin", model, nothing, work, opts.threads, spinning=True, cpp=cpp)
    columns += _decode_kernel_columns(opts, model, nothing, work, skipped, quantize=False, cpp=cpp)
    if opts.fp16_kv:
        columns += _decode_kernel_columns(opts, model, nothing, work, skipped, quantize=False, cpp=cpp,
                                          kv_dtype="float16")
    for k in budgets:
        # offline set only: the ideal speedup counts the offline set, so online FFNs would blur the comparison
        plan = adaskip_plan(calib, k, "e2e", model.fingerprint, spec.name, online=False)
        [col] = _ort_column(f"ort-adaskip-k{k}", model, plan, work, opts.threads)
        col.layout = SkipLayout.from_plan(plan)
        col.note += "; e2e skips " + ", ".join(sublayer_name(j) for j in plan.skip)
        col.skipped = list(plan.skip)
        columns.append(col)
    if opts.genai:
        columns += _genai_columns(model.source, "fp32", work, opts.threads, opts.spinning_pair, spec)
    if opts.int4:
        columns += _ort_column("ort-int4", model, nothing, work, opts.threads, quantize=True, cpp=cpp)
        if opts.spinning_pair:
            columns += _ort_column("ort-int4-spin", model, nothing, work, opts.threads, quantize=True, spinning=True,
                                   cpp=cpp)
        columns += _decode_kernel_columns(opts, model, nothing, work, skipped, quantize=True, cpp=cpp)
        if opts.genai:
            columns += _genai_columns(model.source, "int4", work, opts.threads, opts.spinning_pair, spec)
    if opts.int8_kv:
        columns += _int8_kv_columns(opts, model, tokenizer, nothing, work, cpp, skipped)
    if opts.llamacpp and opts.llamacpp_types:
        reason = llamacpp.unavailable()
        if reason is None:
            _add_llamacpp_columns(columns, opts, model.source, spec, max(contexts) + opts.decode_tokens + 1, work)
        else:
            skipped["llama.cpp"] = reason
            print(f"adaskip-bench: no llama.cpp columns: {reason}", file=sys.stderr)

    results: dict[str, dict[int, dict[str, list[float]]]] = {c.name: {} for c in columns}
    # the kernels' rates are measured in every repeat, next to the columns, and the best kept: a shared machine's
    # busy moments slow a measurement, never speed it up
    gemm: dict[int, float] = {}
    attention: dict[int, float | None] = {}
    bandwidth = gemv = 0.0
    for ctx in contexts:
        prompt = corpus[:ctx]
        for rep in range(opts.repeats):
            gemm[ctx] = max(gemm.get(ctx, 0.0), _gemm_gflops(spec, opts.threads))
            bandwidth = max(bandwidth, read_bandwidth_gbs(opts.threads))
            gemv = max(gemv, _gemv_gbs(spec, opts.threads))
            rate = _attention_gflops(spec, opts.threads, ctx)
            attention[ctx] = None if rate is None else max(attention.get(ctx) or 0.0, rate)
            order = columns[rep % len(columns):] + columns[:rep % len(columns)]
            for col in order:
                ttft, per_token = col.run(prompt, opts.decode_tokens)
                slot = results[col.name].setdefault(ctx, {"ttft": [], "decode": []})
                slot["ttft"].append(ttft)
                slot["decode"].append(per_token)
                print(f"adaskip-bench: {ctx:>5} tokens  repeat {rep + 1}/{opts.repeats}  {col.name:<18} "
                      f"TTFT {ttft:7.3f} s  decode {per_token * 1000:7.2f} ms/token", file=sys.stderr, flush=True)
    # the bytes-and-FLOPs ideals on this machine's measured rates, and each column's memory floor
    machine = cost.Machine(bandwidth_gbs=round(bandwidth, 1), peak_gflops=round(max(gemm.values()), 1))
    floor_context = {ctx: ctx + opts.decode_tokens // 2 for ctx in contexts}  # the middle of the timed steps
    for col in columns:
        if col.layout is not None:
            col.ideal = {c: {**cost.speedups(spec, col.layout, c, opts.decode_tokens),
                             "roofline": _phases(cost.roofline_speedups(spec, col.layout, c, opts.decode_tokens,
                                                                        ROOFLINE_WIDTHS, machine))}
                         for c in contexts}
    return {"model": opts.model, "threads": opts.threads, "repeats": opts.repeats,
            "decode_tokens": opts.decode_tokens, "contexts": contexts,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "roofline": {"machine": asdict(machine), "widths": asdict(ROOFLINE_WIDTHS)},
            "bandwidth_gbs": bandwidth,
            "gemv_gbs": gemv,
            "skipped": skipped,
            "gemm_gflops": {str(ctx): g for ctx, g in gemm.items()},
            "attention_gflops": {str(ctx): g for ctx, g in attention.items()},
            "columns": [{"name": c.name, "note": c.note, "ideal": c.ideal, "info": c.info,
                         "decode_bytes": {str(ctx): c.decode_bytes(floor_context[ctx]) for ctx in contexts}
                         if c.decode_bytes else {},
                         "prefill_flops": {str(ctx): dict(zip(("matmul", "attention"),
                                                              cost.prefill_split(spec, ctx, c.skipped,
                                                                                 c.last_token_tail)))
                                           for ctx in contexts}}
                        for c in columns],
            "results": {name: {str(ctx): {k: statistics.median(v) for k, v in d.items()} | {"raw": d}
                               for ctx, d in per_ctx.items()} for name, per_ctx in results.items()}}


def _phases(ideal: dict[str, Any]) -> dict[str, float]:
    return {"prefill": ideal["prefill"], "decode": ideal["decode"]}


def _kernel_bound(flops: dict[str, float], gemm: float, attention: float | None) -> float | None:
    """Seconds a prefill takes if every weight product ran at the measured MatMul rate and attention at the measured
    GroupQueryAttention rate, with nothing else costing time: the fastest these kernels allow."""
    return None if attention is None else (flops["matmul"] / gemm + flops["attention"] / attention) / 1e9


def render_markdown(data: dict[str, Any]) -> str:
    res, cols = data["results"], data["columns"]
    machine = data.get("roofline", {}).get("machine", asdict(cost.MACHINE))
    lines = [f"# Benchmarks: {data['model']}", "",
             f"Generated by `adaskip-bench` ({data['threads']} threads, OMP_WAIT_POLICY={data['omp_wait_policy']}, "
             f"every ONNX Runtime session, ours and onnxruntime-genai's, with intra-op spinning off, except the "
             f"`-spin` columns: both engines with spinning on, onnxruntime-genai's default). Medians of "
             f"{data['repeats']} repeats; every "
             f"repeat runs all columns on the same real-text prompt in rotating order. Decode: mean over "
             f"{data['decode_tokens']} greedy tokens after the prompt. Speedup = time of `ort` (our engine, nothing "
             f"skipped) / time of the column. Two ideals (adaskip/cost.py, decode over the same "
             f"{data['decode_tokens']} steps; our engines run "
             f"the sublayers after a prompt's last attention for its last token only, and so do the ideals): FLOPs = "
             f"the FLOP fraction the plan removes; bytes+FLOPs = a per-kernel roofline, max(bytes read / "
             f"{machine['bandwidth_gbs']:g} GB/s, FLOPs / {machine['peak_gflops']:g} GFLOP/s) summed over the "
             f"sublayers "
             f"that run (fp32 weights and KV cache: decode is memory-bound, so a skipped attention saves its weights "
             f"and its KV cache, an FFN its weights; prefill comes to the FLOP fraction); of ideal = speedup / the "
             f"bytes+FLOPs ideal. "
             f"GFLOP/s = the cost model's prefill FLOPs for the column's plan, as that engine runs it, / TTFT. Kernel "
             f"bound = the prefill time if the "
             f"plan's weight products ran at the measured rate of one fp32 MatMul of the model's FFN shape in ONNX "
             f"Runtime and its attention at the measured rate of ONNX Runtime's GroupQueryAttention alone over the "
             f"context (both given per context: the best of one measurement per repeat), with nothing else costing "
             f"time. Decode floor = the bytes one decode step of the column's engine moves (its weights as stored, "
             f"the embedding's one row, its KV cache over the context in its own type) / the memory read bandwidth "
             f"measured in this run; of floor = decode time / floor (1.00 is the memory's limit).", ""]
    if "bandwidth_gbs" in data:
        lines += [f"This machine, measured in this run (best of one measurement per repeat): memory read bandwidth "
                  f"{data['bandwidth_gbs']:.1f} GB/s (a matrix-vector product over a 256 MB fp32 matrix in ONNX "
                  f"Runtime, and torch's sum over it, at {data['threads']} threads); the roofline's rates are these "
                  f"and the best MatMul rate below ({machine['bandwidth_gbs']:g} GB/s, {machine['peak_gflops']:g} "
                  f"GFLOP/s)."]
        if data.get("gemv_gbs"):  # records from before it was measured lack it
            lines[-1] += (f" ONNX Runtime's fp32 matrix-vector product at this model's hidden size (a 256 MB matrix "
                          f"stored in the graph, as an engine's weights are) read {data['gemv_gbs']:.1f} GB/s: an "
                          f"fp32 decode step whose weights go through that kernel runs at "
                          f"{max(1.0, data['bandwidth_gbs'] / data['gemv_gbs']):.2f}x its floor or more.")
        lines.append("")
    builds = {c["info"].get("system_info") for c in cols if c.get("info", {}).get("system_info")}
    for info in sorted(builds):
        lines += [f"llama.cpp build (ggml system info): `{info}`", ""]
    for name, reason in data.get("skipped", {}).items():
        lines += [f"Not measured: {name}: {reason}.", ""]
    for ctx in data["contexts"]:
        key = str(ctx)
        base = res["ort"][key]
        gemm, attention = data["gemm_gflops"][key], data["attention_gflops"][key]
        lines += [f"## {ctx} tokens of context", "",
                  f"Kernels alone: fp32 MatMul {gemm:.0f} GFLOP/s"
                  + ("." if attention is None else f"; GroupQueryAttention, causal over {ctx} tokens in the engine's "
                                                     f"prefill chunks, {attention:.0f} GFLOP/s."), ""]
        lines += ["| column | TTFT (s) | prefill speedup | ideal: FLOPs | bytes+FLOPs | of ideal | GFLOP/s | "
                  "kernel bound (s) | decode (ms/token) | decode floor (ms) | of floor | decode speedup | ideal: FLOPs "
                  "| bytes+FLOPs | of ideal | note |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for col in cols:
            r = res[col["name"]][key]
            ideal = col["ideal"].get(ctx) or col["ideal"].get(key) or {}
            speedup = {"prefill": base["ttft"] / r["ttft"], "decode": base["decode"] / r["decode"]}
            cells = {phase: _ideal_cells(ideal, phase, speedup[phase]) for phase in speedup}
            flops = col["prefill_flops"][key]
            gflops = (flops["matmul"] + flops["attention"]) / r["ttft"] / 1e9
            bound = _kernel_bound(flops, gemm, attention)
            floor = _floor_cells(col.get("decode_bytes", {}).get(key), data.get("bandwidth_gbs"), r["decode"])
            lines.append(f"| {col['name']} | {r['ttft']:.3f} | {speedup['prefill']:.3f} | {cells['prefill']} | "
                         f"{gflops:.0f} | {'' if bound is None else f'{bound:.3f}'} | {r['decode'] * 1000:.2f} | "
                         f"{floor} | {speedup['decode']:.3f} | {cells['decode']} | {col['note']} |")
        lines.append("")
    return "\n".join(lines)


def _ideal_cells(ideal: dict[str, Any], phase: str, speedup: float) -> str:
    """`FLOPs | bytes+FLOPs | of ideal` cells of one phase (empty for a column without a plan)."""
    if not ideal:
        return " |  | "
    roof = ideal.get("roofline", {}).get(phase)
    if roof is None:  # a record from before the bytes-and-FLOPs ideal
        return f"{ideal[phase]:.3f} |  | "
    return f"{ideal[phase]:.3f} | {roof:.3f} | {speedup / roof:.2f}"


def _floor_cells(step_bytes: float | None, bandwidth_gbs: float | None, decode_s: float) -> str:
    """`decode floor (ms) | of floor` cells (empty where the column's bytes or the bandwidth are unknown)."""
    if not step_bytes or not bandwidth_gbs:
        return " | "
    floor = step_bytes / (bandwidth_gbs * 1e9)
    return f"{floor * 1000:.2f} | {decode_s / floor:.2f}"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for col in data["columns"]:
        r = data["results"][col["name"]]
        ctxs = [c for c in data["contexts"] if str(c) in r]
        axes[0].plot(ctxs, [r[str(c)]["ttft"] for c in ctxs], "o-", label=col["name"])
        axes[1].plot(ctxs, [r[str(c)]["decode"] * 1000 for c in ctxs], "o-", label=col["name"])
    axes[0].set_title("time to first token")
    axes[0].set_ylabel("seconds")
    axes[1].set_title("decode")
    axes[1].set_ylabel("ms / token")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{data['model']}, {data['threads']} threads, CPU")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(data: dict[str, Any], out: Path) -> str:
    """benchmarks.json, benchmarks.md and benchmarks.png in `out` (created); returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(data, indent=2))
    md = render_markdown(data)
    (out / "benchmarks.md").write_text(md + "\n![benchmarks](benchmarks.png)\n")
    plot(data, out / "benchmarks.png")
    return md
