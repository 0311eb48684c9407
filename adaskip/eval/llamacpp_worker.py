"""adaskip-bench's llama.cpp worker process: `python -m adaskip.eval.llamacpp_worker worker GGUF ...` loads one GGUF
and times one request per JSON line on stdin; `... quantize SRC DST TYPE` runs llama.cpp's quantizer.

It imports llama-cpp-python and numpy only, never torch (whose OpenMP runtime llama.cpp's would share, with the wait
policy that process started with): adaskip/eval/llamacpp.py starts it without OMP_WAIT_POLICY, as llama.cpp's users
run it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
from typing import IO, Any

_FTYPE = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def build_info(llama_cpp: Any) -> dict[str, Any]:
    """What the worker's llama.cpp is: the llama-cpp-python version, its ggml system info (the CPU features and
    options it was compiled with: AVX2, OpenMP, repacking, llamafile kernels ...) and the OpenMP wait policy seen."""
    return {"llama_cpp_python": importlib.metadata.version("llama-cpp-python"), "ggml": _ggml_version(),
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: OpenMP's default)")}


def _ggml_version() -> str:
    """ggml's version and the llama.cpp commit it was built from (`0.25.3 (0c1e570)`), as its library reports them."""
    import ctypes

    try:
        from llama_cpp._ggml import libggml  # the package's handle on libggml (its ggml-base dependency exports these)

        for fn in (libggml.ggml_version, libggml.ggml_commit):
            fn.restype = ctypes.c_char_p
        return f"{libggml.ggml_version().decode()} ({libggml.ggml_commit().decode()})"
    except (ImportError, AttributeError, OSError):  # a build without them: the package version still says which
        return "unknown"


def time_request(llm: Any, llama_cpp: Any, prompt: list[int], steps: int) -> tuple[float, float, list[int]]:
    """adaskip-bench's timing rules on one llama.cpp context: TTFT = the prompt's forward pass through the greedy
    choice of the first token (read from the last position's logits); decode = the mean time of the next `steps`
    forward passes, each one fed the previous greedy token, through its greedy choice. The cache starts empty.
    Returns (TTFT s, s per decode token, the greedy tokens)."""
    import numpy as np

    n_vocab = llm.n_vocab()

    def greedy() -> int:  # logits of the batch's last (only) output row
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    llm.reset()  # eval() drops the cache from position 0 on
    t0 = time.perf_counter()
    llm.eval(prompt)
    tokens = [greedy()]
    t1 = time.perf_counter()
    for _ in range(steps):
        llm.eval(tokens[-1:])
        tokens.append(greedy())
    return t1 - t0, (time.perf_counter() - t1) / steps, tokens


def _serve(gguf: str, threads: int, n_ctx: int, out: IO[str]) -> None:
    import llama_cpp

    # llama.cpp's own defaults where llama-cpp-python differs: logical batch 2048 (physical 512) and flash attention
    # on (llama.cpp's "auto" picks it on CPU); f16 KV cache, its default
    llm = llama_cpp.Llama(gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=2048, n_ubatch=512,
                          flash_attn=True, logits_all=False, verbose=False)
    out.write(json.dumps({"ready": True, **build_info(llama_cpp), "n_batch": llm.n_batch, "n_ubatch": 512,
                          "flash_attn": True, "kv_cache": "f16",
                          "weight_bytes": int(llama_cpp.llama_model_size(llm.model))}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        ttft, decode, tokens = time_request(llm, llama_cpp, req["prompt"], req["steps"])
        out.write(json.dumps({"ttft": ttft, "decode": decode, "tokens": tokens}) + "\n")
        out.flush()


def _quantize(src: str, dst: str, gguf_type: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, _FTYPE[gguf_type])
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {gguf_type} failed")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m adaskip.eval.llamacpp_worker",
                                description="adaskip-bench's llama.cpp worker")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="load a GGUF, then time one request per JSON line on stdin")
    w.add_argument("gguf")
    w.add_argument("--threads", type=int, required=True)
    w.add_argument("--n-ctx", type=int, required=True)
    q = sub.add_parser("quantize", help="quantize an f32 GGUF with llama.cpp's quantizer")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("type", choices=sorted(_FTYPE))
    q.add_argument("--threads", type=int, required=True)
    a = p.parse_args(argv)
    # the protocol owns stdout; anything the C++ side prints goes to stderr
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if a.cmd == "worker":
        _serve(a.gguf, a.threads, a.n_ctx, out)
    else:
        _quantize(a.src, a.dst, a.type, a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
