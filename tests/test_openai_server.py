"""The OpenAI-compatible server: the official `openai` client (streaming and not), limits as clear 4xx answers, a
full queue as 429 while the server keeps serving, 16 concurrent clients, Prometheus metrics, the real SmolLM2."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from adaskip.deploy.openai_server import OpenAIServer, ServerOptions
from adaskip.errors import InputError
from adaskip.runtime.loader import load_runtime
from adaskip.runtime.generate import SamplingParams
from adaskip.runtime.scheduler import SchedulerOptions

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (head size 16: the `ort` variant), built with
    a calibrated K=2 plan."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from adaskip.cli.build import main as build_main
    from conftest import TINY

    root = tmp_path_factory.mktemp("serve-tiny")
    model_dir = root / "model"
    torch.manual_seed(3)
    cfg = LlamaConfig(**{**TINY, "vocab_size": 49152, "max_position_embeddings": 1024}, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (smollm2_dir / f).exists():
            shutil.copy(smollm2_dir / f, model_dir / f)
    out = root / "tiny-k2"
    assert build_main(["--model", str(model_dir), "-o", str(out), "--skip", "2", "--calib-prompts", "2",
                       "--calib-tokens", "64", "--quiet"]) == 0
    return out


def _server(engine: Path, **kw) -> OpenAIServer:
    sched = kw.pop("scheduler", SchedulerOptions(slots=4, slot_capacity=256, step_tokens=64, max_queue=32))
    return OpenAIServer(ServerOptions(engine_dir=str(engine), port=0, threads=2, scheduler=sched, **kw)).start()


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _client(server: OpenAIServer):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def test_openai_client_streams_and_matches_the_runtime(tiny_engine):
    rt = load_runtime(tiny_engine, threads=2)
    prompt = "The history of the printing press begins"
    expected = rt.generator.generate([rt.tokenizer.encode(prompt)], SamplingParams(max_new_tokens=12))[0]
    with _server(tiny_engine) as server:
        assert server.options.host == "127.0.0.1" and server.port != 0
        client = _client(server)
        name = server.model_name
        assert [m.id for m in client.models.list().data] == [name]
        done = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
        assert done.choices[0].text == expected.text and done.usage.completion_tokens == len(expected.tokens)
        assert done.model_extra["adaskip"]["prefill_skipped"] == expected.prefill_skipped
        pieces, finish, extension = [], None, None
        for chunk in client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0,
                                               stream=True):
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
            extension = (chunk.model_extra or {}).get("adaskip", extension)
        assert "".join(pieces) == expected.text and finish == expected.finish_reason
        assert extension["sublayers"] == rt.engine.spec.num_sublayers
        chat_pieces = []
        stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi there"}],
                                                max_tokens=8, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        usage = None
        for chunk in stream:
            if chunk.choices:
                chat_pieces.append(chunk.choices[0].delta.content or "")
            usage = chunk.usage or usage
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi there"}],
                                              max_tokens=8, temperature=0)
        assert "".join(chat_pieces) == chat.choices[0].message.content and usage.completion_tokens >= 1
        assert chat.choices[0].message.role == "assistant"
        seeded = [client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=1.0, seed=5)
                  .choices[0].text for _ in range(2)]
        assert seeded[0] == seeded[1]  # per-request seeds


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(tiny_engine):
    with _server(tiny_engine, max_tokens_limit=64, max_stop=2, max_stop_chars=8) as server:
        url, name = server.url, server.model_name
        ok = {"model": name, "prompt": "Hello", "max_tokens": 4}
        cases = [
            ({**ok, "max_tokens": 65}, 400, "max_tokens"),
            ({**ok, "max_tokens": 0}, 400, "max_tokens"),
            ({**ok, "stop": ["a", "b", "c"]}, 400, "stop"),
            ({**ok, "stop": "x" * 9}, 400, "stop"),
            ({**ok, "temperature": -1}, 400, "temperature"),
            ({**ok, "n": 2}, 400, "n"),
            ({**ok, "prompt": ""}, 400, "prompt"),
            ({**ok, "prompt": ["a", "b"]}, 400, "one prompt per request"),
            ({**ok, "prompt": [5, 10 ** 9]}, 400, "vocabulary"),
            ({**ok, "prompt": "word " * 400}, 400, "at most 255"),
            ({**ok, "model": "gpt-4"}, 404, "does not exist"),
            ({"model": name}, 400, "prompt"),
        ]
        for body, status, words in cases:
            code, answer = _post(f"{url}/v1/completions", body)
            assert code == status, body
            assert words in answer["error"]["message"], answer
        code, answer = _post(f"{url}/v1/chat/completions", {"model": name, "messages": []})
        assert code == 400 and "messages" in answer["error"]["message"]
        code, answer = _post(f"{url}/v1/chat/completions", {"model": name, "messages": [{"role": "wizard",
                                                                                       "content": "x"}]})
        assert code == 400
        req = urllib.request.Request(f"{url}/v1/completions", data=b"{not json", headers={"Content-Type":
                                                                                         "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400
        code, answer = _post(f"{url}/v1/completions", ok)
        assert code == 200 and answer["usage"]["completion_tokens"] >= 1
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"


def test_full_queue_gets_429_and_the_server_keeps_serving(tiny_engine):
    sched = SchedulerOptions(slots=1, slot_capacity=256, step_tokens=16, max_queue=1)
    with _server(tiny_engine, scheduler=sched) as server:
        body = {"model": server.model_name, "prompt": "Tell me a long story", "max_tokens": 200, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: _post(f"{server.url}/v1/completions", body, timeout=300), range(6)))
        codes = sorted(code for code, _ in answers)
        assert 429 in codes and 200 in codes, codes
        refused = next(a for c, a in answers if c == 429)
        assert refused["error"]["type"] == "rate_limit_error" and "queue is full" in refused["error"]["message"]
        code, answer = _post(f"{server.url}/v1/completions", {**body, "max_tokens": 3})
        assert code == 200 and answer["usage"]["completion_tokens"] == 3
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'adaskip_requests_rejected_total{reason="queue_full"}' in metrics


def test_sixteen_concurrent_clients_by_four_requests_and_metrics(tiny_engine):
    with _server(tiny_engine) as server:
        name = server.model_name

        def client(k: int) -> int:
            c = _client(server)
            errors = 0
            for r in range(4):
                try:
                    if (k + r) % 2:
                        text = "".join(ch.choices[0].text for ch in c.completions.create(
                            model=name, prompt=f"Request {k}.{r}: count", max_tokens=6, stream=True, temperature=0))
                    else:
                        text = c.chat.completions.create(model=name, max_tokens=6, messages=[
                            {"role": "user", "content": f"Client {k} asks {r}"}]).choices[0].message.content
                    errors += not isinstance(text, str)
                except Exception:
                    errors += 1
            return errors

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            assert sum(pool.map(client, range(16))) == 0
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        for name in ("adaskip_queue_depth", "adaskip_running_requests", "adaskip_time_to_first_token_seconds_bucket",
                     "adaskip_inter_token_latency_seconds_bucket", 'adaskip_skipped_sublayers_total{decision='
                     '"offline",phase="prefill"}', 'adaskip_sublayers_total{phase="decode"}'):
            assert name in metrics, name
        done = [line for line in metrics.splitlines() if line.startswith("adaskip_requests_total")]
        assert sum(float(line.split()[-1]) for line in done) == 64
        assert max(r.decoded.__len__() for r in server.scheduler.records) > 1  # requests shared decode steps


def test_client_going_away_cancels_its_request(tiny_engine):
    import http.client

    with _server(tiny_engine) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({
            "model": server.model_name, "prompt": "Go on", "max_tokens": 250, "ignore_eos": True, "stream": True}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        conn.close()  # the client leaves mid-stream
        for _ in range(600):
            if server.scheduler.idle:
                break
            import time

            time.sleep(0.05)
        assert server.scheduler.idle
        cancelled = [r for r in server.scheduler.records if r.cancelled]
        assert cancelled and not any(len(r.decoded) for r in list(server.scheduler.records)[-1:]
                                     if r.index > cancelled[-1].index)


def test_options_and_cli_refuse_bad_input(tiny_engine, tmp_path, capsys):
    from adaskip.cli import serve_openai

    with pytest.raises(InputError, match="does not exist"):
        OpenAIServer(ServerOptions(engine_dir=str(tmp_path / "none")))
    with pytest.raises(InputError, match="max_tokens_limit"):
        OpenAIServer(ServerOptions(engine_dir=str(tiny_engine), max_tokens_limit=10 ** 6))
    assert serve_openai.main(["--engine", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert serve_openai.main(["--engine", str(tiny_engine), "--slots", "8", "--step-tokens", "8"]) == 2
    assert "step_tokens" in capsys.readouterr().err
    a = serve_openai.parser().parse_args(["--engine", "x"])
    assert a.host == "127.0.0.1"


def test_real_smollm2_end_to_end(smollm2_k8_engine):
    rt = load_runtime(smollm2_k8_engine, threads=2)
    prompts = ["What is the capital of France?", "Name three primary colors."]
    ids = [rt.generator.encode(p, chat=True) for p in prompts]
    params = SamplingParams(max_new_tokens=16)
    expected = [rt.generator.generate([x], params)[0].text for x in ids]
    sched = SchedulerOptions(slots=2, slot_capacity=256, step_tokens=64, max_queue=4)
    with _server(smollm2_k8_engine, scheduler=sched) as server:
        client = _client(server)

        def ask(p: str) -> str:
            return client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": p}],
                                                  max_tokens=16, temperature=0).choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            assert list(pool.map(ask, prompts)) == expected
    assert "Paris" in expected[0]
