"""An OpenAI-compatible HTTP server on the in-flight batching scheduler (adaskip/runtime/scheduler.py).

FastAPI + uvicorn, request bodies as pydantic models of the OpenAI schema with this server's limits (prompt size,
max_tokens, stop count and length) built in, so a bad request gets a clear 400 in OpenAI's error shape and the
server goes on serving. Endpoints: /v1/completions and /v1/chat/completions (SSE streaming or not), /v1/models,
/health, Prometheus /metrics. Each response carries an `adaskip` extension field with what the request skipped.

The scheduler runs on its own thread; a request's tokens reach its handler through an asyncio queue fed from the
scheduler's listener. A client that goes away cancels its request: its slot is free at the next step.
"""


import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal

from adaskip.errors import AdaskipError, InputError
from adaskip.runtime.generate import GenerationResult, SamplingParams, TokenEvent
from adaskip.runtime.loader import load_runtime
from adaskip.runtime.scheduler import QueueFull, RequestHandle, Scheduler, SchedulerOptions, StepRecord


@dataclass
class ServerOptions:
    engine_dir: str = ""
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000  # 0: any free port (see OpenAIServer.port)
    model_name: str | None = None  # the id clients send; the engine dir's name when None
    threads: int | None = None  # ONNX Runtime intra-op threads (None: ADASKIP_THREADS or all cores)
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)
    max_prompt_tokens: int | None = None  # None: what a slot holds beside one new token
    max_tokens_limit: int | None = None  # largest max_tokens a request may ask for; None: slot capacity - 1
    default_max_tokens: int = 256  # when a request names none (less when the prompt leaves less room in a slot)
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 64  # characters per stop string
    max_messages: int = 256
    log_level: str = "warning"

    def validate(self) -> None:
        if not self.engine_dir:
            raise InputError("give the engine directory to serve (--engine DIR)")
        if not Path(self.engine_dir).is_dir():
            raise InputError(f"engine directory {self.engine_dir} does not exist")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InputError(f"port must be in 0..65535; got {self.port!r}")
        self.scheduler.validate()
        cap = self.scheduler.slot_capacity
        for name in ("max_prompt_tokens", "max_tokens_limit"):
            value = getattr(self, name)
            if value is not None and not 1 <= value < cap:
                raise InputError(f"{name} must be in 1..{cap - 1} (a slot holds {cap} positions); got {value}")
        for name in ("default_max_tokens", "max_stop", "max_stop_chars", "max_messages"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1; got {getattr(self, name)}")

    @property
    def token_limit(self) -> int:
        return self.max_tokens_limit or self.scheduler.slot_capacity - 1

    @property
    def prompt_limit(self) -> int:
        return self.max_prompt_tokens or self.scheduler.slot_capacity - 1


# -- request models (the OpenAI schema, with this server's limits) ----------------------------------------------------
def request_models(opts: ServerOptions) -> tuple[type, type]:
    """The pydantic models of /v1/completions and /v1/chat/completions bodies under `opts`' limits."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    Stop = Annotated[str, Field(min_length=1, max_length=opts.max_stop_chars)]
    MaxTokens = Annotated[int, Field(ge=1, le=opts.token_limit)]
    prompt_chars = 16 * opts.prompt_limit  # a bound before tokenizing; the token count is checked after

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Common(BaseModel):
        # unknown fields are ignored, as OpenAI-compatible servers do (clients and load tools send extras)
        model_config = ConfigDict(extra="ignore")
        model: str
        max_tokens: MaxTokens | None = None
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        top_k: int = Field(0, ge=0)  # extension (vLLM's): 0 is off
        n: Literal[1] = 1
        seed: int | None = Field(None, ge=0, le=2 ** 63 - 1)
        stop: Stop | Annotated[list[Stop], Field(max_length=opts.max_stop)] | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None
        ignore_eos: bool = False  # extension (vLLM's): generate max_tokens whatever the model says
        logprobs: None | Literal[False] = None  # not served
        user: str | None = None

        def sampling(self, max_tokens: int | None, prompt_tokens: int) -> SamplingParams:
            stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
            room = max(opts.scheduler.slot_capacity - prompt_tokens, 1)
            default = min(opts.default_max_tokens, opts.token_limit, room)
            return SamplingParams(max_new_tokens=max_tokens or default,
                                  temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                  seed=self.seed, stop_strings=stop, stop_token_ids=() if self.ignore_eos else None)

    class CompletionRequest(Common):
        prompt: Annotated[str, Field(min_length=1, max_length=prompt_chars)] | \
            Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=opts.prompt_limit)]
        echo: Literal[False] = False
        suffix: None = None

        @field_validator("prompt", mode="before")
        @classmethod
        def one_prompt(cls, v: Any) -> Any:
            if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
                return v[0]  # a batch of one
            if isinstance(v, list) and v and isinstance(v[0], (str, list)):
                raise ValueError("one prompt per request (send several requests: they are batched in flight)")
            return v

    class TextPart(BaseModel):
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "user", "assistant", "developer"]
        content: Annotated[str, Field(max_length=prompt_chars)] | list[TextPart]

        def text(self) -> str:
            return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    class ChatRequest(Common):
        messages: Annotated[list[Message], Field(min_length=1, max_length=opts.max_messages)]
        max_completion_tokens: MaxTokens | None = None

        @model_validator(mode="after")
        def total_size(self) -> "ChatRequest":
            if sum(len(m.text()) for m in self.messages) > prompt_chars:
                raise ValueError(f"the messages exceed {prompt_chars} characters")
            return self

    return CompletionRequest, ChatRequest


# -- metrics ----------------------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in a registry of their own (several servers may live in one process, e.g. tests)."""

    def __init__(self, scheduler: Scheduler, num_sublayers: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.n = num_sublayers
        Gauge("adaskip_queue_depth", "Requests waiting for a KV slot", registry=r).set_function(
            lambda: scheduler.queue_depth)
        Gauge("adaskip_running_requests", "Requests holding a KV slot (decoding or prefilling)",
              registry=r).set_function(lambda: scheduler.running)
        latency = (.005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 2, 5, 10, 30, 60)
        self.ttft = Histogram("adaskip_time_to_first_token_seconds", "Arrival to first token", buckets=latency,
                              registry=r)
        self.itl = Histogram("adaskip_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=latency, registry=r)
        self.step = Histogram("adaskip_step_seconds", "One scheduler step", buckets=latency, registry=r)
        self.step_rows = Histogram("adaskip_decode_batch_rows", "Rows in a step's decode",
                                   buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.skipped = Counter("adaskip_skipped_sublayers", "Sublayer executions skipped (prefill: per prompt "
                               "token; decode: per row and step)", ["phase", "decision"], registry=r)
        self.sublayers = Counter("adaskip_sublayers", "Sublayer executions a model skipping nothing would run",
                                 ["phase"], registry=r)
        self.requests = Counter("adaskip_requests", "Finished requests", ["finish_reason"], registry=r)
        self.rejected = Counter("adaskip_requests_rejected", "Requests refused", ["reason"], registry=r)
        self.prompt_tokens = Counter("adaskip_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("adaskip_generation_tokens", "Generated tokens", registry=r)

    def on_step(self, record: StepRecord) -> None:
        self.step.observe(record.seconds)
        self.step_rows.observe(len(record.decoded))
        rows = len(record.decoded)
        self.sublayers.labels("decode").inc(rows * self.n)
        self.skipped.labels("decode", "offline").inc(record.skipped_sublayers - record.online_skips)
        self.skipped.labels("decode", "online").inc(record.online_skips)

    def on_finish(self, result: GenerationResult) -> None:
        self.requests.labels(result.finish_reason).inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(len(result.tokens))
        if result.finish_reason != "cancelled" or result.tokens:
            self.sublayers.labels("prefill").inc(result.prompt_tokens * self.n)
            self.skipped.labels("prefill", "offline").inc(result.prompt_tokens * len(result.prefill_skipped))


# -- the server -------------------------------------------------------------------------------------------------------
def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


def skip_stats(result: GenerationResult, num_sublayers: int) -> dict[str, Any]:
    """The `adaskip` extension field of a response: what this request skipped."""
    return {"prefill_skipped": result.prefill_skipped, "decode_skipped_offline": result.decode_skipped_offline,
            "decode_skipped_online": result.online_skipped, "sublayers": num_sublayers,
            "kv_bytes": result.kv_bytes, "kv_bytes_saved": result.kv_bytes_full - result.kv_bytes,
            "ttft_s": round(result.ttft_s, 6), "truncated_prompt": result.truncated_prompt}


class _Stream:
    """One request's events, from the scheduler's thread into the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics):
        self.loop, self.metrics = loop, metrics
        self.queue: asyncio.Queue[TokenEvent | None] = asyncio.Queue()
        self.last: float | None = None

    def listener(self, handle: RequestHandle, event: TokenEvent | None) -> None:  # the scheduler's thread
        now = time.perf_counter()
        if event is not None and event.token is not None:
            if self.last is None:
                self.metrics.ttft.observe(now - handle.submitted)
            else:
                self.metrics.itl.observe(now - self.last)
            self.last = now
        if event is None and handle.result is not None:
            self.metrics.on_finish(handle.result)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class OpenAIServer:
    """The app and its scheduler. `start()` serves on a background thread (tests, embedding); `run()` blocks."""

    def __init__(self, options: ServerOptions):
        options.validate()
        self.options = opts = options
        self.runtime = rt = load_runtime(opts.engine_dir, threads=opts.threads)
        self.model_name = opts.model_name or Path(opts.engine_dir).resolve().name
        self.num_sublayers = rt.engine.spec.num_sublayers
        self.scheduler = Scheduler(rt.engine, rt.policy, opts.scheduler, rt.tokenizer,
                                   rt.generator.eos_token_ids)
        self.metrics = Metrics(self.scheduler, self.num_sublayers)
        self.scheduler.on_step = self.metrics.on_step
        self.created = int(time.time())
        self.app = self._app()
        self._server = None
        self._thread: threading.Thread | None = None

    # -- prompts ------------------------------------------------------------------------------------------------------
    def _chat_ids(self, messages: list[Any]) -> list[int]:
        tok = self.runtime.tokenizer
        if not getattr(tok, "chat_template", None):
            raise InputError("this model has no chat template: use /v1/completions")
        text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                       add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    def _check_size(self, ids: list[int]) -> list[int]:
        if len(ids) > self.options.prompt_limit:
            raise InputError(f"the prompt has {len(ids)} tokens; this server takes at most "
                             f"{self.options.prompt_limit}")
        return ids

    # -- the app ------------------------------------------------------------------------------------------------------
    def _app(self):
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, Response

        CompletionRequest, ChatRequest = request_models(self.options)
        app = FastAPI(title="adaskip OpenAI-compatible server")
        metrics = self.metrics

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError):
            metrics.rejected.labels("invalid").inc()
            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            return _error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else
                          str(first.get("msg", "invalid request")), param=where or None)

        @app.get("/health")
        async def health():
            alive = self.scheduler._thread is not None and self.scheduler._thread.is_alive()
            return JSONResponse({"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                "owned_by": "adaskip"}]}

        @app.get("/metrics")
        async def prometheus():
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request):  # type: ignore[valid-type]
            def ids() -> list[int]:
                if isinstance(body.prompt, str):
                    return self._check_size(self.runtime.tokenizer.encode(body.prompt))
                return list(body.prompt)

            return await self._serve(body, request, ids, body.max_tokens, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatRequest, request: Request):  # type: ignore[valid-type]
            return await self._serve(body, request, lambda: self._check_size(self._chat_ids(body.messages)),
                                     body.max_completion_tokens or body.max_tokens, chat=True)

        return app

    async def _serve(self, body: Any, request: Any, ids, max_tokens: int | None, chat: bool):
        from fastapi.responses import JSONResponse, StreamingResponse

        if body.model != self.model_name:
            self.metrics.rejected.labels("unknown_model").inc()
            return _error(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                          param="model")
        stream = _Stream(asyncio.get_running_loop(), self.metrics)
        try:
            prompt = ids()
            handle = self.scheduler.submit(prompt, body.sampling(max_tokens, len(prompt)), listener=stream.listener)
        except QueueFull as e:
            self.metrics.rejected.labels("queue_full").inc()
            return _error(429, str(e), kind="rate_limit_error")
        except AdaskipError as e:
            self.metrics.rejected.labels("invalid").inc()
            return _error(400, str(e))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(handle, stream, rid, chat, include_usage),
                                     media_type="text/event-stream")
        text = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(stream.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                if event is None:
                    break
                text.append(event.text)
        except asyncio.CancelledError:
            handle.cancel()
            raise
        result = handle.result
        if handle.error is not None:
            return _error(500, handle.error, kind="server_error")
        choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": [choice], "usage": self._usage(result),
                "adaskip": skip_stats(result, self.num_sublayers)}

    @staticmethod
    def _usage(result: GenerationResult) -> dict[str, int]:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.tokens),
                "total_tokens": result.prompt_tokens + len(result.tokens)}

    async def _sse(self, handle: RequestHandle, stream: _Stream, rid: str, chat: bool,
                   include_usage: bool) -> AsyncIterator[str]:
        created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, role: bool = False, **extra: Any) -> str:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if role else \
                    ({} if delta is None else {"content": delta})
                choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [choice],
                    **extra}
            return f"data: {json.dumps(body)}\n\n"

        finished = False
        try:
            if chat:
                yield chunk(None, None, role=True)
            while True:
                event = await stream.queue.get()
                if event is None:
                    break
                if event.text:
                    yield chunk(event.text, None)
            finished = True
            result = handle.result
            if handle.error is not None:
                yield f"data: {json.dumps({'error': {'message': handle.error, 'type': 'server_error'}})}\n\n"
            else:
                yield chunk(None if chat else "", result.finish_reason,
                            adaskip=skip_stats(result, self.num_sublayers))
                if include_usage:
                    yield (f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': self.model_name, 'choices': [], 'usage': self._usage(result)})}\n\n")
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away: free the slot at the next step
                handle.cancel()

    # -- running ------------------------------------------------------------------------------------------------------
    def _uvicorn(self):
        import uvicorn

        config = uvicorn.Config(self.app, host=self.options.host, port=self.options.port,
                                log_level=self.options.log_level, timeout_graceful_shutdown=5)
        return uvicorn.Server(config)

    def run(self) -> None:
        """Serves until interrupted."""
        self.scheduler.start()
        try:
            self._uvicorn().run()
        finally:
            self.scheduler.stop()

    def start(self, timeout: float = 60.0) -> "OpenAIServer":
        """Serves on a background thread; returns once the socket listens."""
        self.scheduler.start()
        self._server = server = self._uvicorn()
        self._thread = threading.Thread(target=server.run, name="adaskip-openai-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise AdaskipError(f"the server did not start on {self.options.host}:{self.options.port}")
            time.sleep(0.05)
        return self

    @property
    def port(self) -> int:
        """The port it listens on (the one the OS picked when options.port is 0)."""
        if self._server is None or not self._server.servers:
            return self.options.port
        return self._server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.scheduler.stop()

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
