"""The C++ runtime (cpp/runtime's `adaskip_generate`) as adaskip-bench columns: the same engine dir driven by the
embedded C++ loop instead of the Python Generator, so the table shows what the Python step loop costs (the loop
onnxruntime-genai runs is C++ too).

The program stays loaded in a worker process (`adaskip_generate --jsonl`: one request per stdin line, one JSON
answer per line) and times each request itself, with the Generator's rules: TTFT up to the first sampled token,
decode from there to the last one, per decode forward.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from adaskip.errors import InputError, ModelLoadError
from adaskip.eval.line_worker import LineWorker


def check_program(path: str) -> Path:
    """The `adaskip_generate` program at `path`, or InputError saying what is wrong with it."""
    program = Path(path)
    if not program.is_file() or not os.access(program, os.X_OK):
        raise InputError(f"--cpp-runtime {path}: no executable there (build it: cmake --build build --target "
                         "adaskip_generate; see docs/cpp-runtime.md)")
    return program


class Worker(LineWorker):
    """One engine dir loaded by `adaskip_generate --jsonl`; `run(prompt, steps)` -> (TTFT s, s per decode token)."""

    def __init__(self, program: Path, engine_dir: Path, threads: int, spinning: bool = False,
                 decode_kernels: str = ""):
        # spinning and the decode kernels (cpp/ortops's library, or "": none) set either way, as for the Python
        # columns: ADASKIP_SPINNING or ADASKIP_DECODE_KERNELS in the bench's environment changes no column
        kernels = ["--decode-kernels", decode_kernels] if decode_kernels else []
        super().__init__([str(program), "--engine", str(engine_dir), "--jsonl", "--threads", str(threads), *kernels],
                         "adaskip_generate", env={**os.environ, "ADASKIP_SPINNING": "1" if spinning else "0",
                                                  "ADASKIP_DECODE_KERNELS": ""})
        # one short request now: a program that cannot open the engine (or predates --jsonl) fails here, with its
        # own message, not at the first timed cell after every other column is built
        self.request([0], 1)

    def request(self, prompt: list[int], steps: int) -> dict[str, Any]:
        """The program's JSON result for `steps` greedy decode steps after the prompt (no stop tokens)."""
        reply = self.ask({"ids": prompt, "max_new_tokens": steps + 1, "stop_ids": []})
        if "error" in reply:
            raise ModelLoadError(f"adaskip_generate refused a benchmark request: {reply['error']}")
        return reply

    def run(self, prompt: list[int], steps: int) -> tuple[float, float]:
        r = self.request(prompt, steps)
        return r["ttft_s"], r["decode_s"] / steps
