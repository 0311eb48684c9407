"""adaskip-deploy triton + adaskip-serve: the real tritonserver (bundled in nvidia-pytriton) serving a real SmolLM2 K=8
e2e engine on the in-flight batching scheduler, called with tritonclient over HTTP and gRPC (and HTTP generate /
generate_stream), checked token for token against the Python runtime's solo runs."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from adaskip.cli import deploy as deploy_cli
from adaskip.cli import serve as serve_cli
from adaskip.deploy.triton_repo import MODEL_TEMPLATE

MODEL, STREAM_MODEL, ONE_MODEL = "adaskip", "adaskip_stream", "adaskip_one"
SHORT = ["The capital of France is", "Water boils at", "1, 2, 3, 4,", "Once upon a time", "The sky is blue because",
         "def add(a, b):", "My favourite food is", "The largest planet is"]
STATS = ("prefill_skipped", "decode_skipped_offline", "decode_skipped_online")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def engine(smollm2_k8_engine) -> Path:
    return smollm2_k8_engine


@pytest.fixture(scope="module")
def repo(engine, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    small = ["--slot-capacity", "1024"]  # KV memory for 3 models on a shared CI host
    assert deploy_cli.main(["triton", "--engine", str(engine), "--repo", str(out), *small]) == 0
    assert deploy_cli.main(["triton", "--engine", str(engine), "--repo", str(out), "--model-name", STREAM_MODEL,
                            "--decoupled", "--max-batch-size", "4", "--slots", "4", "--step-tokens", "64",
                            *small]) == 0
    # one slot and a queue of one: a third request is refused while two are in flight
    assert deploy_cli.main(["triton", "--engine", str(engine), "--repo", str(out), "--model-name", ONE_MODEL,
                            "--decoupled", "--slots", "1", "--max-queue-size", "1", *small]) == 0
    return out


class Server:
    def __init__(self, repo: Path, log: Path):
        self.http_port, self.grpc_port, self.metrics_port = _free_ports(3)
        env = {**os.environ, "ADASKIP_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # 2 instances on 2 cores
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adaskip.cli.serve", "--repo", str(repo), "--http-port", str(self.http_port),
             "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port)],
            env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.triton_pid = self._wait_ready(timeout=300)
        self.http = thttp.InferenceServerClient(f"127.0.0.1:{self.http_port}")
        self.grpc = tgrpc.InferenceServerClient(f"127.0.0.1:{self.grpc_port}")

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def _wait_ready(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith("adaskip-serve: ready"):
                return int(line.split("tritonserver pid ")[1].split(")")[0])
        self.stop()
        pytest.fail(f"adaskip-serve did not get ready; log tail:\n{self.log.read_text()[-3000:]}")

    def stop(self, timeout: float = 90) -> int:
        """Stop by PID with SIGTERM (adaskip-serve forwards it); kill if it does not go. Clients close first: the
        server waits (up to its exit timeout) for open HTTP connections before it unloads the models."""
        for client in (getattr(self, "http", None), getattr(self, "grpc", None)):
            if client is not None:
                client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    srv = Server(repo, tmp_path_factory.mktemp("triton") / "server.log")
    yield srv
    srv.stop()
    if srv.triton_pid and Path(f"/proc/{srv.triton_pid}").exists():  # never leave a tritonserver behind
        os.kill(srv.triton_pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def runtime(engine):
    """The Python runtime on the same engine dir, with the server's thread count (same float reductions)."""
    from adaskip.runtime.loader import load_runtime

    return load_runtime(engine, threads=1)


_REFERENCE: dict = {}


def _expected(runtime, text: str, max_tokens: int, chat: bool = False, **sampling):
    """The Python runtime's result for one request run alone (cached: several tests ask for the same one)."""
    from adaskip.runtime.generate import SamplingParams

    key = (id(runtime), text, max_tokens, chat, tuple(sorted(sampling.items())))
    if key not in _REFERENCE:
        gen = runtime.generator
        params = SamplingParams(max_new_tokens=max_tokens, **sampling)
        _REFERENCE[key] = gen.generate([gen.encode(text, chat=chat)], params)[0]
    return _REFERENCE[key]


@pytest.fixture(scope="module")
def long_prompt(runtime) -> tuple[str, object]:
    """A ~400-token real text on which the online FFN skipping fires within 24 new tokens (the window is 20)."""
    from adaskip.calibrate.corpus import builtin_text

    text = builtin_text()
    for start in (40000, 10000, 20000, 60000):
        prompt = text[start:start + 1500]
        ref = _expected(runtime, prompt, 24)
        if ref.online_skipped:
            return prompt, ref
    pytest.fail("no candidate prompt made the online FFN skipping fire")


def _inputs(mod, text, n, batched=True, **options) -> list:
    """Request tensors for a model with max_batch_size > 0 (shape [1, ...]); options: name -> (value, type), they
    override text_input and max_tokens too."""
    values = {"text_input": (text, "BYTES"), "max_tokens": (n, "INT32"), **options}
    out = []
    for name, (value, dtype) in values.items():
        np_type = {"BYTES": np.object_, "INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64,
                   "BOOL": np.bool_}[dtype]
        items = value if isinstance(value, list) else [value]
        items = [v.encode() if isinstance(v, str) else v for v in items]
        arr = np.array([items] if batched else items, dtype=np_type)
        t = mod.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def _decoded(result) -> dict:
    got = {"text": result.as_numpy("text_output").reshape(-1)[0].decode(),
           "tokens": result.as_numpy("output_ids").reshape(-1).tolist(),
           "finish_reason": result.as_numpy("finish_reason").reshape(-1)[0].decode(),
           "prompt_tokens": int(result.as_numpy("prompt_tokens").reshape(-1)[0]),
           "kv_bytes_saved": int(result.as_numpy("kv_bytes_saved").reshape(-1)[0])}
    for name in STATS:
        got[name] = result.as_numpy(name).reshape(-1).tolist()
    return got


def _want(ref) -> dict:
    s = ref.summary()
    return {"text": ref.text, "tokens": ref.tokens, "finish_reason": ref.finish_reason,
            "prompt_tokens": ref.prompt_tokens, "kv_bytes_saved": s["kv_bytes_saved"],
            **{name: s[name] for name in STATS}}


def _metrics(server, model: str) -> dict[str, float]:
    """The model's adaskip_* custom metrics on Triton's metrics port: {"name" or "name{reason}": value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for name, labels, value in re.findall(r"^(adaskip_\w+)\{([^}]*)\} (\S+)$", text, re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if fields.get("model") == model:
            key = f"{name}{{{fields['reason']}}}" if "reason" in fields else name
            out[key] = out.get(key, 0.0) + float(value)
    return out


def _wait_metric(server, model: str, key: str, want: float, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        got = _metrics(server, model)
        if got.get(key, 0.0) == want or time.monotonic() > deadline:
            assert got.get(key, 0.0) == want, (key, got)
            return got
        time.sleep(0.2)


def _stream(client, model, inputs, timeout=120) -> list:
    """All responses of one request on a gRPC stream, up to the one flagged final."""
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        out = []
        while True:
            result, error = got.get(timeout=timeout)
            if error is not None:
                out.append(error)
                return out
            out.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()


# -- the repository -----------------------------------------------------------------------------------------------
def test_deploy_writes_a_self_contained_repository(repo, engine):
    model = repo / MODEL
    assert sorted(p.name for p in repo.iterdir()) == [MODEL, ONE_MODEL, STREAM_MODEL]
    assert (model / "1" / "model.py").read_text() == MODEL_TEMPLATE.read_text()
    copied = model / "1" / "engine"
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in engine.iterdir())
    assert (copied / "model.onnx.data").stat().st_size == (engine / "model.onnx.data").stat().st_size
    config = (model / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 8" in config and "dynamic_batching" in config
    assert "decoupled" not in config and 'string_value: "engine"' in config
    stream_config = (repo / STREAM_MODEL / "config.pbtxt").read_text()
    assert "model_transaction_policy { decoupled: true }" in stream_config and "max_batch_size: 4" in stream_config
    for key, value in (("slots", "4"), ("slot_capacity", "1024"), ("step_tokens", "64"), ("max_queue_size", "64")):
        assert f'key: "{key}" value {{ string_value: "{value}" }}' in stream_config  # the scheduler's options
    one = (repo / ONE_MODEL / "config.pbtxt").read_text()
    assert 'key: "slots" value { string_value: "1" }' in one and "max_queue_size: 1 }" in one
    for name in ("text_input", "max_tokens", "temperature", "top_k", "top_p", "random_seed", "stop_words", "stream",
                 "text_output", "output_ids", *STATS):
        assert f'name: "{name}"' in config
    if sys.prefix != sys.base_prefix:  # --python-env auto: the venv that deployed it
        assert f'key: "EXECUTION_ENV_PATH" value {{ string_value: "{Path(sys.prefix).absolute()}" }}' in config


def test_deploy_refusals_leave_the_repository_as_it_was(repo, engine, tmp_path, capsys):
    def fails(argv, match):
        assert deploy_cli.main(["triton", *argv]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, err

    before = sorted(str(p) for p in repo.rglob("*"))
    fails(["--engine", str(engine), "--repo", str(repo)], "already exists (pass --force")
    fails(["--engine", str(tmp_path), "--repo", str(repo), "--model-name", "other"], "not an adaskip engine")
    fails(["--engine", str(engine), "--repo", str(repo), "--model-name", "x", "--instances", "0"], "--instances")
    fails(["--engine", str(engine), "--repo", str(repo), "--model-name", "x", "--max-batch-size", "-1"],
          "--max-batch-size")
    fails(["--engine", str(engine), "--repo", str(repo), "--model-name", "../x"], "model name")
    fails(["--engine", str(engine), "--repo", str(repo), "--model-name", "x", "--slot-capacity", "9000"],
          "slot_capacity 9000 exceeds the model's context of 8192 tokens (adaskip-deploy --slots")
    fails(["--engine", str(engine), "--repo", str(repo), "--model-name", "x", "--slots", "8", "--step-tokens", "8"],
          "step_tokens (8) must exceed slots (8)")
    fails(["--engine", str(engine), "--repo", str(repo), "--model-name", "x", "--slots", "0"], "slots must be")
    fails(["--engine", str(engine), "--repo", str(repo), "--model-name", "x", "--python-env", str(tmp_path)],
          "not a Python environment")
    (tmp_path / "notes.txt").write_text("not a model")
    fails(["--engine", str(engine), "--repo", str(tmp_path)], "not a Triton model repository")
    assert sorted(str(p) for p in repo.rglob("*")) == before
    assert not any(".partial-" in p.name for p in repo.parent.iterdir())
    # --force replaces one model (a referenced engine this time) and nothing else
    other = tmp_path / "repo"
    assert deploy_cli.main(["triton", "--engine", str(engine), "--repo", str(other)]) == 0
    assert deploy_cli.main(["triton", "--engine", str(engine), "--repo", str(other), "--engine-mode", "reference",
                            "--force"]) == 0
    assert not (other / MODEL / "1" / "engine").exists()
    assert f'string_value: "{engine.resolve()}"' in (other / MODEL / "config.pbtxt").read_text()


def test_serve_refusals(tmp_path, capsys):
    def fails(argv, match):
        assert serve_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, err

    fails(["--repo", str(tmp_path / "missing")], "no such directory")
    fails(["--repo", str(tmp_path)], "holds no model")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text('backend: "python"\n')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fails(["--repo", str(tmp_path), "--http-port", str(port)], f"http port {port} on 127.0.0.1 is not available")
    fails(["--repo", str(tmp_path), "--http-port", "9000", "--grpc-port", "9000"], "must differ")


def test_serve_exits_with_the_server_status_when_a_model_cannot_load(engine, tmp_path):
    bad = tmp_path / "repo"
    assert deploy_cli.main(["triton", "--engine", str(engine), "--repo", str(bad), "--engine-mode", "reference"]) == 0
    config = bad / MODEL / "config.pbtxt"
    config.write_text(config.read_text().replace(str(engine.resolve()), str(tmp_path / "gone")))
    http, grpc, metrics = _free_ports(3)
    run = subprocess.run([sys.executable, "-m", "adaskip.cli.serve", "--repo", str(bad), "--http-port", str(http),
                          "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "ADASKIP_THREADS": "1"})
    assert run.returncode == 1, run.stderr[-3000:]
    assert "gone does not exist" in run.stderr  # the model's own message, in the server log
    assert "adaskip-serve: error: tritonserver exited with status 1" in run.stderr
    assert "ready" not in run.stdout


# -- the server --------------------------------------------------------------------------------------------------
def test_http_generates_exactly_what_the_python_runtime_does(server, long_prompt):
    prompt, ref = long_prompt
    result = server.http.infer(MODEL, _inputs(thttp, prompt, 24))
    got = _decoded(result)
    assert got == _want(ref)
    assert got["decode_skipped_online"], "the online FFN skipping fired in the runtime and must in the server"
    assert len(got["prefill_skipped"]) == 8


def test_grpc_generates_exactly_what_the_python_runtime_does(server, runtime):
    ref = _expected(runtime, "What is the capital of France?", 16, chat=True)
    result = server.grpc.infer(MODEL, _inputs(tgrpc, "What is the capital of France?", 16, chat=(True, "BOOL")))
    assert _decoded(result) == _want(ref)


def test_grpc_stream_from_the_decoupled_model(server, long_prompt):
    prompt, ref = long_prompt
    responses = _stream(server.grpc, STREAM_MODEL, _inputs(tgrpc, prompt, 24, stream=(True, "BOOL")))
    assert not any(isinstance(r, InferenceServerException) for r in responses), responses
    *tokens, final = responses
    assert len(tokens) >= 2, "a streamed request gets one response per token"
    assert [t for r in tokens for t in r.as_numpy("output_ids").reshape(-1).tolist()] == ref.tokens
    texts = [r.as_numpy("text_output").reshape(-1)[0].decode() for r in tokens]
    assert "".join(texts) == ref.text
    got = _decoded(final)
    assert got["text"] == "" and got["tokens"] == []  # the final response carries the statistics only
    want = _want(ref)
    assert {k: got[k] for k in (*STATS, "finish_reason", "prompt_tokens", "kv_bytes_saved")} == \
        {k: want[k] for k in (*STATS, "finish_reason", "prompt_tokens", "kv_bytes_saved")}

def test_decoupled_model_without_stream_sends_one_response(server, runtime):
    whole = _stream(server.grpc, STREAM_MODEL, _inputs(tgrpc, SHORT[0], 8, stream=(False, "BOOL")))
    assert len(whole) == 1 and _decoded(whole[0]) == _want(_expected(runtime, SHORT[0], 8))


def test_sampling_options_reach_the_generator(server, runtime):
    options = {"temperature": (0.9, "FP32"), "top_k": (40, "INT32"), "top_p": (0.95, "FP32"),
               "random_seed": (1234, "UINT64")}
    ref = _expected(runtime, "Once upon a time", 10, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    first = _decoded(server.http.infer(MODEL, _inputs(thttp, "Once upon a time", 10, **options)))
    again = _decoded(server.grpc.infer(MODEL, _inputs(tgrpc, "Once upon a time", 10, **options)))
    assert first == again == _want(ref)
    stop = _expected(runtime, "The capital of France is", 16, stop_strings=("France",))
    got = _decoded(server.http.infer(MODEL, _inputs(thttp, "The capital of France is", 16,
                                                   stop_words=(["France", ""], "BYTES"))))
    assert got == _want(stop) and got["finish_reason"] == "stop" and "France" not in got["text"]


def test_concurrent_clients_get_the_sequential_outputs(server, runtime):
    sequential = {}
    t0 = time.perf_counter()
    for prompt in SHORT:
        sequential[prompt] = _decoded(server.http.infer(MODEL, _inputs(thttp, prompt, 8)))
    seq_s = time.perf_counter() - t0
    for prompt in SHORT[:4]:  # and those equal the Python runtime
        assert sequential[prompt] == _want(_expected(runtime, prompt, 8))

    def client(c: int) -> list[tuple[str, dict, float]]:
        out = []
        # half the clients over gRPC, half over HTTP, each with its own connection
        mod = tgrpc if c % 2 else thttp
        conn = mod.InferenceServerClient(f"127.0.0.1:{server.grpc_port if c % 2 else server.http_port}")
        for k in range(4):
            prompt = SHORT[(c + k) % len(SHORT)]
            start = time.perf_counter()
            result = conn.infer(MODEL, _inputs(mod, prompt, 8))
            out.append((prompt, _decoded(result), time.perf_counter() - start))
        conn.close()
        return out

    before = _metrics(server, MODEL)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        done = [f.result() for f in [pool.submit(client, c) for c in range(16)]]  # raises on any error
    wall = time.perf_counter() - t0
    answers = [a for per_client in done for a in per_client]
    assert len(answers) == 64
    after = _metrics(server, MODEL)
    steps = after["adaskip_decode_steps"] - before.get("adaskip_decode_steps", 0)
    rows = after["adaskip_decode_rows"] - before.get("adaskip_decode_rows", 0)
    assert after["adaskip_requests{length}"] - before.get("adaskip_requests{length}", 0) == 64
    assert rows / steps > 1.5, "the scheduler decoded concurrent requests in shared steps"
    mismatched = [(p, {k: (v, sequential[p][k]) for k, v in got.items() if v != sequential[p][k]})
                  for p, got, _ in answers if got != sequential[p]]
    assert not mismatched, mismatched
    lat = sorted(x for _, _, x in answers)
    print(f"\n[triton] sequential: {len(SHORT)} requests in {seq_s:.2f} s ({seq_s / len(SHORT) * 1000:.0f} ms each); "
          f"16 clients x 4 requests: {wall:.2f} s, {64 / wall:.2f} req/s, {64 * 8 / wall:.1f} tok/s, latency p50 "
          f"{statistics.median(lat) * 1000:.0f} ms, p95 {lat[int(0.95 * len(lat)) - 1] * 1000:.0f} ms, mean decode "
          f"batch {rows / steps:.1f} rows")


def _one_stream(server, prompt: str, max_tokens: int, **options) -> list:
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        return _stream(client, STREAM_MODEL, _inputs(tgrpc, prompt, max_tokens, stream=(True, "BOOL"), **options))
    finally:
        client.close()


def _streamed(responses: list) -> tuple[list[int], str, dict]:
    assert not any(isinstance(r, InferenceServerException) for r in responses), responses
    *tokens, final = responses
    return ([t for r in tokens for t in r.as_numpy("output_ids").reshape(-1).tolist()],
            "".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r in tokens), _decoded(final))


def test_concurrent_streams_with_different_lengths_equal_their_solo_runs(server, runtime):
    """Requests with different max_tokens (and one seeded sampled request) stream from one scheduler: each joins and
    leaves the running batch on its own, and every client gets exactly its solo tokens."""
    jobs = [(SHORT[0], 4, {}), (SHORT[1], 12, {}), (SHORT[2], 20, {}), (SHORT[3], 7, {}),
            (SHORT[4], 16, {"temperature": (0.8, "FP32"), "random_seed": (7, "UINT64")}), (SHORT[5], 9, {})]
    before = _metrics(server, STREAM_MODEL)
    with ThreadPoolExecutor(len(jobs)) as pool:
        streams = list(pool.map(lambda job: _one_stream(server, job[0], job[1], **job[2]), jobs))
    for (prompt, n, options), responses in zip(jobs, streams):
        sampling = {"temperature": 0.8, "seed": 7} if options else {}
        ref = _expected(runtime, prompt, n, **sampling)
        tokens, text, final = _streamed(responses)
        assert (tokens, text) == (ref.tokens, ref.text), (prompt, n)
        assert final["finish_reason"] == ref.finish_reason and final["decode_skipped_offline"] == \
            ref.decode_skipped_offline
    after = _metrics(server, STREAM_MODEL)
    rows = after["adaskip_decode_rows"] - before.get("adaskip_decode_rows", 0)
    steps = after["adaskip_decode_steps"] - before.get("adaskip_decode_steps", 0)
    assert rows > steps, "the streams shared decode steps"


def test_http_generate_and_generate_stream(server, runtime):
    """Triton's HTTP generate extension (what `curl` reaches): one JSON answer, or server-sent events per token
    from the decoupled model."""
    ref = _expected(runtime, SHORT[0], 8)
    body = json.dumps({"text_input": SHORT[0], "max_tokens": 8}).encode()
    for model in (MODEL, STREAM_MODEL):
        req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v2/models/{model}/generate", data=body)
        with urllib.request.urlopen(req, timeout=120) as r:
            got = json.loads(r.read())
        assert (got["text_output"], got["output_ids"], got["finish_reason"]) == (ref.text, ref.tokens, "length")
    body = json.dumps({"text_input": SHORT[0], "max_tokens": 8, "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v2/models/{STREAM_MODEL}/generate_stream",
                                 data=body)
    with urllib.request.urlopen(req, timeout=120) as r:
        events = [json.loads(line[len(b"data: "):]) for line in r.read().splitlines() if line.startswith(b"data: ")]
    *tokens, final = events
    assert [e["output_ids"] for e in tokens] == ref.tokens and "".join(e["text_output"] for e in tokens) == ref.text
    assert final["finish_reason"] == "length" and final["decode_skipped_offline"] == ref.decode_skipped_offline


def test_a_full_queue_is_refused_and_a_cancelled_request_frees_its_slot(server, runtime):
    """ONE_MODEL has one slot and a queue of one: A holds the slot, B waits, C is refused (UNAVAILABLE) and the
    server keeps serving; the client of A goes away (gRPC stream cancelled), A's slot is freed, and B runs."""
    a_events: queue.Queue = queue.Queue()
    a = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    a.start_stream(callback=lambda result, error: a_events.put((result, error)))
    a.async_stream_infer(ONE_MODEL, _inputs(tgrpc, "Tell me a long story about a dragon.", 1000,
                                            stream=(True, "BOOL")))
    for _ in range(2):  # A is decoding
        result, error = a_events.get(timeout=120)
        assert error is None, error
    b_out: dict = {}
    b_client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    b = threading.Thread(target=lambda: b_out.update(r=_stream(b_client, ONE_MODEL, _inputs(tgrpc, SHORT[1], 6))))
    b.start()
    _wait_metric(server, ONE_MODEL, "adaskip_queue_depth", 1)
    refused = _stream(server.grpc, ONE_MODEL, _inputs(tgrpc, SHORT[2], 4))
    assert len(refused) == 1 and isinstance(refused[0], InferenceServerException), refused
    assert "the admission queue is full" in str(refused[0]), refused[0]
    body = json.dumps({"text_input": SHORT[2], "max_tokens": 4}).encode()
    with pytest.raises(urllib.error.HTTPError) as http_refused:  # the same over HTTP generate (2.51 answers 400 for
        urllib.request.urlopen(urllib.request.Request(           # any error there; HTTP infer gives 503)
            f"http://127.0.0.1:{server.http_port}/v2/models/{ONE_MODEL}/generate", data=body), timeout=60)
    assert http_refused.value.code == 400 and "queue is full" in http_refused.value.read().decode()
    _wait_metric(server, ONE_MODEL, "adaskip_requests_rejected{queue_full}", 2)  # both refusals counted
    assert b.is_alive(), "B waits for the slot A holds"
    a.stop_stream(cancel_requests=True)  # A's client goes away
    a.close()
    b.join(timeout=120)
    b_client.close()
    assert not b.is_alive()
    assert len(b_out["r"]) == 1 and _decoded(b_out["r"][0]) == _want(_expected(runtime, SHORT[1], 6))
    got = _wait_metric(server, ONE_MODEL, "adaskip_running_requests", 0)
    assert got["adaskip_requests{cancelled}"] == 1 and got.get("adaskip_requests{length}", 0) == 1
    assert _decoded(_stream(server.grpc, ONE_MODEL, _inputs(tgrpc, SHORT[0], 4))[0])["tokens"]  # still serving


def test_malformed_requests_get_errors_and_the_server_keeps_serving(server):
    bad = {
        "empty text": _inputs(thttp, "", 8),
        "blank text": _inputs(thttp, "  \n", 8),
        "max_tokens 0": _inputs(thttp, "hi", 0),
        "max_tokens negative": _inputs(thttp, "hi", -5),
        "max_tokens absurd": _inputs(thttp, "hi", 2**31 - 1),
        "max_tokens = context": _inputs(thttp, "hi", 8192),
        "max_tokens float": _inputs(thttp, "hi", 8.0, max_tokens=(8.0, "FP32")),
        "text as int": _inputs(thttp, "hi", 8, text_input=(7, "INT32")),
        "missing max_tokens": _inputs(thttp, "hi", 8)[:1],
        "two prompts in one request": [_two_prompts()] + _inputs(thttp, "hi", 8)[1:],
        "not UTF-8": _inputs(thttp, b"\xff\xfe", 8),
        "temperature negative": _inputs(thttp, "hi", 8, temperature=(-1.0, "FP32")),
        "temperature nan": _inputs(thttp, "hi", 8, temperature=(float("nan"), "FP32")),
        "top_p 0": _inputs(thttp, "hi", 8, top_p=(0.0, "FP32")),
        "top_k negative": _inputs(thttp, "hi", 8, top_k=(-2, "INT32")),
        "stream on a non-decoupled model": _inputs(thttp, "hi", 8, stream=(True, "BOOL")),
    }
    for case, inputs in bad.items():
        with pytest.raises(InferenceServerException) as err:
            server.http.infer(MODEL, inputs)
        assert err.value.status() == "400", (case, err.value)
    with pytest.raises(InferenceServerException, match="max_tokens must be >= 1"):
        server.grpc.infer(MODEL, _inputs(tgrpc, "hi", 0))
    with pytest.raises(InferenceServerException, match="decoupled"):  # HTTP cannot reach a decoupled model
        server.http.infer(STREAM_MODEL, _inputs(thttp, "hi", 4))
    for inputs in (_inputs(tgrpc, "", 4, stream=(True, "BOOL")), _inputs(tgrpc, "hi", -1, stream=(True, "BOOL"))):
        responses = _stream(server.grpc, STREAM_MODEL, inputs)
        assert len(responses) == 1 and isinstance(responses[0], InferenceServerException)
    assert server.http.is_server_live() and server.http.is_server_ready() and server.http.is_model_ready(MODEL)
    assert _decoded(server.http.infer(MODEL, _inputs(thttp, SHORT[0], 4)))["tokens"]
    assert server.proc.poll() is None


def _two_prompts():
    t = thttp.InferInput("text_input", [2, 1], "BYTES")
    t.set_data_from_numpy(np.array([[b"hi"], [b"there"]], dtype=np.object_))
    return t


def test_sigterm_stops_the_server_cleanly(server):
    """Last: stop adaskip-serve by PID; it forwards SIGTERM, the server unloads its models and both exit 0."""
    t0 = time.perf_counter()
    assert server.stop() == 0
    assert not Path(f"/proc/{server.triton_pid}").exists()
    print(f"\n[triton] stopped in {time.perf_counter() - t0:.1f} s")
