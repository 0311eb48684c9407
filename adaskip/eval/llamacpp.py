"""llama.cpp (through llama-cpp-python, the `[llamacpp]` extra) as an anchor for adaskip-bench.

The same weights: the model's Hugging Face directory converted to an f32 GGUF with llama.cpp's own
`convert_hf_to_gguf.py`, then q8_0 and q4_0 made from that f32 file with llama.cpp's quantizer (what `llama-quantize`
does, its default tensor mix). The converter is the one in the sdist of the llama-cpp-python version installed
(`vendor/llama.cpp/`), fetched once with pip into the adaskip cache, unless a path to one is given.

Each GGUF runs in a worker process of its own (adaskip/eval/llamacpp_worker.py): llama.cpp is built with
OpenMP and its users run it with OpenMP's default wait policy (threads spin a while before they sleep), while our
engines are benchmarked under OMP_WAIT_POLICY=PASSIVE, which made llama.cpp's decode 2-3x slower here. A process
reads that variable once, when its OpenMP runtime loads, and torch (imported by adaskip-bench) loads one with the same
soname that llama.cpp's library would then share: so the worker starts without the variable and never imports torch.
The worker times a request itself with the timing rules of adaskip-bench's other columns.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from adaskip.errors import InputError, ModelLoadError
from adaskip.eval.line_worker import LineWorker
from adaskip.model.builtin import cache_root

GGUF_TYPES = ("f32", "q8_0", "q4_0")  # what adaskip-bench can run: the f32 conversion and two quantizations of it
WORKER = "adaskip.eval.llamacpp_worker"
_DONE = ".adaskip-complete"
DISTRIBUTION = "llama-cpp-python"


def unavailable() -> str | None:
    """Why the llama.cpp columns cannot run here (None when they can)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'adaskip[llamacpp]'; it compiles llama.cpp)"
    if importlib.util.find_spec("sentencepiece") is None:
        return "sentencepiece is not installed (llama.cpp's converter imports it; pip install 'adaskip[llamacpp]')"
    return None


def version() -> str:
    return importlib.metadata.version(DISTRIBUTION)


def converter(explicit: str | None = None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py: `explicit` (a llama.cpp checkout's, next to its `conversion/` and
    `gguf-py/`), else the one in the sdist of the installed llama-cpp-python, fetched once into the adaskip cache."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise InputError(f"--llamacpp-convert {explicit}: no such file (llama.cpp's convert_hf_to_gguf.py)")
        return path
    ver = version()
    root = cache_root() / "llama.cpp" / f"{DISTRIBUTION}-{ver}"
    if (root / _DONE).is_file():
        return root / "convert_hf_to_gguf.py"
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=root.parent))
    try:
        print(f"adaskip-bench: fetching the {DISTRIBUTION}=={ver} sdist for llama.cpp's converter (once)",
              file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               "--disable-pip-version-check", "-q", "-d", str(work), f"{DISTRIBUTION}=={ver}"],
                              capture_output=True, text=True)
        sdists = list(work.glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no sdist"
            raise ModelLoadError(f"could not download the {DISTRIBUTION}=={ver} sdist for its converter: {last} "
                                 f"(or pass --llamacpp-convert PATH)")
        out = work / "vendor"
        with tarfile.open(sdists[0]) as tar:
            wanted = [m for m in tar.getmembers() if _converter_member(m.name)]
            # the "data" filter (no links out, no device files) where this Python has it (3.10.12+, 3.11.4+)
            tar.extractall(out, members=wanted, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        src = next(out.glob("*/vendor/llama.cpp"))
        (src / _DONE).write_text(json.dumps({"sdist": sdists[0].name}))
        if root.exists():  # an earlier broken or concurrent attempt
            shutil.rmtree(root)
        os.replace(src, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return root / "convert_hf_to_gguf.py"


def _converter_member(name: str) -> bool:
    """The converter, the model modules it imports, the gguf-py it puts on its path, llama.cpp's license."""
    parts = name.split("/")
    if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
        return False
    rest = parts[3:]
    return rest in (["convert_hf_to_gguf.py"], ["LICENSE"]) or rest[0] in ("conversion", "gguf-py")


def make_ggufs(hf_dir: str, types: list[str], work: Path, convert_script: Path, threads: int) -> dict[str, Path]:
    """GGUFs of the weights in `hf_dir` for each of `types`: f32 by the converter, the others quantized from it."""
    if not (Path(hf_dir) / "config.json").is_file():
        raise InputError(f"the llama.cpp columns convert a Hugging Face directory; {hf_dir} is not one "
                         "(pass --no-llamacpp)")
    f32 = work / "llamacpp-f32.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py
    proc = subprocess.run([sys.executable, str(convert_script), str(hf_dir), "--outtype", "f32", "--outfile", str(f32)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not f32.is_file():
        raise ModelLoadError(f"llama.cpp's converter failed on {hf_dir}: {proc.stderr.strip()[-400:]}")
    out = {"f32": f32}
    for t in types:
        if t != "f32":
            out[t] = work / f"llamacpp-{t}.gguf"
            _worker_call(["quantize", str(f32), str(out[t]), t, "--threads", str(threads)])
    return {t: out[t] for t in types}


def _worker_env() -> dict[str, str]:
    """The environment llama.cpp runs in: ours without OMP_WAIT_POLICY (OpenMP's default, as its users run it)."""
    return {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}


def _worker_call(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", WORKER, *args], capture_output=True, text=True,
                          env=_worker_env())
    if proc.returncode != 0:
        raise ModelLoadError(f"llama.cpp {args[0]} failed: {proc.stderr.strip()[-400:]}")
    return proc.stdout


class Worker(LineWorker):
    """One GGUF loaded in a worker process; `run(prompt, steps)` -> (TTFT s, s per decode token), timed there."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        super().__init__([sys.executable, "-m", WORKER, "worker", str(gguf), "--threads", str(threads),
                          "--n-ctx", str(n_ctx)], "the llama.cpp worker", env=_worker_env())
        self.info = {k: v for k, v in self.reply().items() if k != "ready"}

    def request(self, prompt: list[int], steps: int) -> dict[str, Any]:
        """{"ttft": s, "decode": s per token, "tokens": the greedy tokens (steps + 1)}."""
        return self.ask({"prompt": prompt, "steps": steps})

    def run(self, prompt: list[int], steps: int) -> tuple[float, float]:
        r = self.request(prompt, steps)
        return r["ttft"], r["decode"]
