"""Triton Python-backend model serving an adaskip engine dir (copied into <repo>/<model>/1/model.py).

In-flight batching (engines with KV slots: the `ort` graph variant, what adaskip-build picks whenever it can): the
model runs adaskip's scheduler (adaskip/runtime/scheduler.py, the one the OpenAI server runs) on a background thread.
execute() only validates the requests, submits them and returns; every response goes out through the request's
response sender from the scheduler's thread as its tokens are made, so requests join and leave the running batch at
every step, whatever their max_tokens, stop words or sampling options. A full admission queue answers that request
with an UNAVAILABLE error; a cancelled request (the client went away) frees its slot at the next step. This holds for
both transaction policies: a decoupled model streams (`stream` true: one response per token, then a final response
with the skip statistics and Triton's final flag; otherwise one response with everything); a request/response model
sends exactly one response per request through the same sender.

Static batching (engines without KV slots: the portable graph, the torch engine, TensorRT): each execute() runs the
requests Triton's dynamic batcher gathered. Greedy requests with the same max_tokens and stop words run as one
left-padded Generator batch; sampled requests run alone so that a seed gives the same tokens however requests arrive.
An instance serves one batch at a time. The model logs which mode it runs when it loads.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Python backend stub


class RequestError(ValueError):
    """A request this model refuses; the client gets the message, the model keeps serving."""


@dataclass
class Job:
    index: int  # position in execute()'s request list
    request: Any
    ids: list[int]
    params: Any  # adaskip SamplingParams
    stream: bool
    sender: Any = None  # the request's response sender (decoupled models; every model on the scheduler)
    alive: bool = True  # false once sending failed (client gone)
    handle: Any = None  # the scheduler's RequestHandle
    finished: bool = False  # the scheduler is done with it (its final response is sent or was attempted)


def _invalid(message: str):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


def _internal(message: str):
    code = getattr(pb_utils.TritonError, "INTERNAL", None)
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


def _error(message: str, kind: str):
    """A TritonError of kind UNAVAILABLE / CANCELLED / ... (the plain error where the stub lacks that code)."""
    code = getattr(pb_utils.TritonError, kind, None)
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


class _Metrics:
    """Triton custom metrics (on the server's /metrics port) of one model instance's scheduler. Every update is a
    message to the server process, so values are sent only when they change."""

    def __init__(self, labels: dict[str, str]):
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.families = {
            "queue": pb_utils.MetricFamily("adaskip_queue_depth", "Requests waiting for a KV slot", gauge),
            "running": pb_utils.MetricFamily("adaskip_running_requests", "Requests holding a KV slot", gauge),
            "steps": pb_utils.MetricFamily("adaskip_decode_steps", "Scheduler steps with a decode forward", counter),
            "rows": pb_utils.MetricFamily("adaskip_decode_rows", "Rows decoded, summed over steps (rows / steps: "
                                          "the mean decode batch)", counter),
            "finished": pb_utils.MetricFamily("adaskip_requests", "Requests the scheduler finished, by finish "
                                              "reason", counter),
            "rejected": pb_utils.MetricFamily("adaskip_requests_rejected", "Requests refused, by reason", counter),
        }
        self.labels = labels
        self.metrics: dict[tuple, Any] = {}
        self.last: dict[tuple, float] = {}

        self.lock = threading.Lock()  # execute() (rejections) and the scheduler's thread both update

    def _metric(self, family: str, **extra: str) -> Any:
        key = (family, *sorted(extra.items()))
        if key not in self.metrics:
            self.metrics[key] = self.families[family].Metric(labels={**self.labels, **extra})
        return self.metrics[key]

    def set(self, family: str, value: float) -> None:
        with self.lock:
            if self.families and self.last.get((family,)) != value:
                self._metric(family).set(value)
                self.last[(family,)] = value

    def inc(self, family: str, value: float = 1, **extra: str) -> None:
        with self.lock:
            if self.families and value:
                self._metric(family, **extra).increment(value)

    def close(self) -> None:
        with self.lock:
            self.metrics.clear()  # Metric objects go before their MetricFamily
            self.families.clear()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch

        from adaskip import __version__
        from adaskip.model.environment import quiet_libraries

        quiet_libraries()
        self.config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in self.config.get("parameters", {}).items()}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)
        self.batched = int(self.config.get("max_batch_size", 0)) > 0
        self.out_types = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in self.config["output"]}
        engine = Path(params.get("engine_dir", "engine"))
        if not engine.is_absolute():
            engine = Path(args["model_repository"]) / args["model_version"] / engine
        from adaskip.runtime import generate
        from adaskip.runtime.generate import SamplingParams
        from adaskip.runtime.loader import load_runtime
        from adaskip.runtime.ort_engines import thread_count

        threads = thread_count(int(params.get("threads") or 0) or None)  # the config's count, else ADASKIP_THREADS
        if threads:
            torch.set_num_threads(threads)  # sampling ops; ONNX Runtime gets the same count below
        if params.get("adaskip_version", __version__) != __version__:
            pb_utils.Logger.log_warn(f"model deployed with adaskip {params['adaskip_version']}, serving with "
                                     f"{__version__}: redeploy if requests fail")
        self.max_stops, self.max_stop_chars = generate.MAX_STOP_STRINGS, generate.MAX_STOP_CHARS

        self.SamplingParams = SamplingParams
        self.runtime = rt = load_runtime(engine, threads=threads or None)
        self.generator = rt.generator
        self.context = self.generator.context_len
        self.max_input_bytes = int(params.get("max_input_bytes") or 0) or 32 * self.context
        self.limit = self.context  # positions a request may use: the context, or a KV slot on the scheduler
        self.scheduler = self.metrics = None
        self.jobs: dict[int, Job] = {}  # the scheduler's requests in flight, by handle id
        self.lock = threading.Lock()
        self.closing = False
        self.next_cancel_check = 0.0
        if getattr(rt.engine, "supports_slots", False):
            mode = self._start_scheduler(params, args)
        else:  # the portable graph, the torch engine, TensorRT: no KV slots, so whole batches (as before)
            mode = (f"static batching: {type(rt.engine).__name__} runs whole batches only (in-flight batching "
                    f"needs the `ort` graph variant)")
        pb_utils.Logger.log_info(f"adaskip: serving {engine} ({rt.engine_dir.backend} backend, plan "
                                 f"{rt.policy.plan.method} K={len(rt.policy.plan.skip)}, "
                                 f"{'decoupled' if self.decoupled else 'request/response'}, "
                                 f"threads {threads or 'default'}; {mode})")

    def _start_scheduler(self, params: dict[str, str], args: dict) -> str:
        from adaskip.deploy.triton_repo import model_scheduler_options
        from adaskip.runtime.scheduler import QueueFull, Scheduler, SchedulerClosed

        opts = model_scheduler_options(params, self.context)
        self.QueueFull, self.Unavailable = QueueFull, (QueueFull, SchedulerClosed)
        rt = self.runtime
        try:
            self.metrics = _Metrics({"model": args.get("model_name", ""),
                                     "instance": args.get("model_instance_name", "")})
        except Exception as e:  # an older stub without custom metrics: serve without them
            pb_utils.Logger.log_warn(f"adaskip: no custom metrics ({e})")
        self.scheduler = Scheduler(rt.engine, rt.policy, opts, rt.tokenizer, rt.generator.eos_token_ids,
                                   on_step=self._on_step)
        self.limit = opts.slot_capacity
        self.scheduler.start()
        return (f"in-flight batching: {opts.slots} slots of {opts.slot_capacity} positions, {opts.step_tokens} "
                f"tokens per step, queue {opts.max_queue}")

    # -- request parsing ---------------------------------------------------------------------------------------
    def _input(self, request: Any, name: str, required: bool = False) -> np.ndarray | None:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            if required:
                raise RequestError(f"input '{name}' is required")
            return None
        return tensor.as_numpy().reshape(-1)

    def _scalar(self, request: Any, name: str, required: bool = False) -> Any:
        values = self._input(request, name, required)
        if values is None:
            return None
        if values.size != 1:
            raise RequestError(f"input '{name}' carries {values.size} values; send one prompt per request (the "
                               f"server batches concurrent requests itself)")
        return values[0]

    @staticmethod
    def _text(value: Any, name: str) -> str:
        try:
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise RequestError(f"input '{name}' is not UTF-8 text") from None

    def _parse(self, request: Any) -> tuple[list[int], Any, bool]:
        from adaskip.errors import InputError

        raw = self._scalar(request, "text_input", required=True)
        if len(raw if isinstance(raw, bytes) else str(raw)) > self.max_input_bytes:  # before decoding or tokenizing
            raise RequestError(f"text_input has {len(raw)} bytes; this model takes at most {self.max_input_bytes} "
                               f"(its context is {self.context} tokens)")
        text = self._text(raw, "text_input")
        if not text.strip():
            raise RequestError("text_input is empty")
        max_tokens = int(self._scalar(request, "max_tokens", required=True))
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1; got {max_tokens}")
        if max_tokens >= self.limit:
            raise RequestError(f"max_tokens {max_tokens} exceeds {self._room()}")
        temperature = self._scalar(request, "temperature")
        temperature = 0.0 if temperature is None else float(temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0; got {temperature}")
        top_k = self._scalar(request, "top_k")
        top_p = self._scalar(request, "top_p")
        seed = self._scalar(request, "random_seed")
        stops = self._input(request, "stop_words")
        if stops is not None and stops.size > self.max_stops:  # bounded before anything is decoded
            raise RequestError(f"at most {self.max_stops} stop_words; got {stops.size}")
        if stops is not None and any(len(v) > 4 * self.max_stop_chars for v in stops if isinstance(v, bytes)):
            raise RequestError(f"a stop word has at most {self.max_stop_chars} characters")
        stop_words = tuple(s for s in (self._text(v, "stop_words") for v in stops) if s) if stops is not None else ()
        chat = self._scalar(request, "chat")
        stream = self._scalar(request, "stream")
        stream = bool(stream) if stream is not None else False
        if stream and not self.decoupled:
            raise RequestError("stream=true needs a decoupled model: deploy with `adaskip-deploy triton --decoupled` "
                               "and send the request over a gRPC stream")
        params = self.SamplingParams(
            max_new_tokens=max_tokens, temperature=temperature, top_k=0 if top_k is None else int(top_k),
            top_p=1.0 if top_p is None else float(top_p), seed=None if seed is None else int(seed),
            stop_strings=stop_words)
        try:
            params.validate()
            ids = self.generator.encode(text, chat=bool(chat) if chat is not None else False)
        except InputError as e:
            raise RequestError(str(e)) from None
        if len(ids) + max_tokens > self.limit:
            raise RequestError(f"the prompt has {len(ids)} tokens; with max_tokens {max_tokens} that exceeds "
                               f"{self._room()}")
        return ids, params, stream

    def _room(self) -> str:
        if self.scheduler is None:
            return f"the model's context of {self.context} tokens"
        return f"this model's KV slot of {self.limit} positions (adaskip-deploy --slot-capacity)"

    @staticmethod
    def _group_key(job: Job) -> tuple:
        p = job.params
        if p.temperature > 0:  # sampled: alone, so its seed's draws do not depend on what it was batched with
            return ("sampled", job.index)
        return ("greedy", p.max_new_tokens, p.stop_strings)  # greedy ignores top_k, top_p and the seed

    # -- responses ---------------------------------------------------------------------------------------------
    def _tensor(self, name: str, values: list) -> Any:
        if self.out_types[name] == np.object_:
            arr = np.array([v.encode("utf-8") for v in values], dtype=np.object_)
        else:
            arr = np.array(values, dtype=self.out_types[name])
        return pb_utils.Tensor(name, arr.reshape(1, -1) if self.batched else arr)

    def _token_response(self, text: str, token: int | None) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[
            self._tensor("text_output", [text]), self._tensor("output_ids", [] if token is None else [token])])

    def _final_response(self, result: Any, job: Job) -> Any:
        s, streamed = result.summary(), job.stream
        return pb_utils.InferenceResponse(output_tensors=[
            self._tensor("text_output", ["" if streamed else result.text]),  # streamed text came as deltas
            self._tensor("output_ids", [] if streamed else result.tokens),
            self._tensor("finish_reason", [result.finish_reason]),
            self._tensor("prompt_tokens", [result.prompt_tokens]),
            self._tensor("prefill_skipped", s["prefill_skipped"]),
            self._tensor("decode_skipped_offline", s["decode_skipped_offline"]),
            self._tensor("decode_skipped_online", s["decode_skipped_online"]),
            self._tensor("kv_bytes_saved", [s["kv_bytes_saved"]]),  # the request's own positions, as if alone
        ])

    def _send(self, job: Job, response: Any, final: bool = False) -> bool:
        """Sends through the request's response sender; False (and nothing more is sent to it) once that fails."""
        if not job.alive:
            return False
        try:
            job.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)
            return True
        except Exception as e:  # the client went away: finish the others
            job.alive = False
            pb_utils.Logger.log_warn(f"adaskip: cannot send a response ({e}); dropping that request's output")
            return False

    # -- execution ---------------------------------------------------------------------------------------------
    def execute(self, requests: list) -> list | None:
        if self.scheduler is not None:
            self._submit(requests)
            return None  # every response goes out through the request's sender
        responses: list[Any] = [None] * len(requests)
        jobs: list[Job] = []
        for n, request in enumerate(requests):
            sender = request.get_response_sender() if self.decoupled else None
            try:
                ids, params, stream = self._parse(request)
            except (RequestError, ValueError, TypeError, OverflowError) as e:
                error = pb_utils.InferenceResponse(error=_invalid(str(e)))
                if self.decoupled:
                    self._send(Job(n, request, [], None, False, sender), error, final=True)
                else:
                    responses[n] = error
                continue
            jobs.append(Job(n, request, ids, params, stream, sender))
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(self._group_key(job), []).append(job)
        for group in groups.values():
            self._run_group(group, responses)
        return None if self.decoupled else responses

    # -- in-flight batching: execute() submits, the scheduler's thread answers ------------------------------------
    def _submit(self, requests: list) -> None:
        from adaskip.errors import AdaskipError

        for n, request in enumerate(requests):
            # a request/response model may answer through the sender too: exactly one response, flagged final
            job = Job(n, request, [], None, False, request.get_response_sender())
            try:
                job.ids, job.params, job.stream = self._parse(request)
                job.handle = self.scheduler.submit(job.ids, job.params, listener=self._listener(job))
            except self.Unavailable as e:  # the queue is full, or the model is unloading
                self._reject(job, "queue_full" if isinstance(e, self.QueueFull) else "closed",
                             _error(str(e), "UNAVAILABLE"))
                continue
            except (RequestError, AdaskipError, ValueError, TypeError, OverflowError) as e:
                self._reject(job, "invalid", _invalid(str(e)))
                continue
            with self.lock:
                if not job.finished:  # it may have finished already on the scheduler's thread
                    self.jobs[job.handle.id] = job

    def _reject(self, job: Job, reason: str, error: Any) -> None:
        if self.metrics is not None:  # counted before the answer goes out: a client that reads /metrics after its
            self.metrics.inc("rejected", reason=reason)  # error must find it there (a race under load otherwise)
        self._send(job, pb_utils.InferenceResponse(error=error), final=True)

    def _listener(self, job: Job):
        def on_event(handle: Any, event: Any) -> None:  # the scheduler's thread; must not block
            if event is not None:
                if job.stream and (event.text or event.token is not None):
                    if not self._send(job, self._token_response(event.text, event.token)):
                        handle.cancel()  # nobody reads it: free the slot
                return
            with self.lock:
                job.finished = True
                self.jobs.pop(handle.id, None)
            result = handle.result
            if self.metrics is not None:
                self.metrics.inc("finished", reason=result.finish_reason if handle.error is None else "error")
            if handle.error is not None:
                response = pb_utils.InferenceResponse(error=_internal(handle.error))
            elif result.finish_reason == "cancelled":
                why = "the model is unloading" if self.closing else "the request was cancelled"
                response = pb_utils.InferenceResponse(error=_error(why, "CANCELLED"))
            else:
                response = self._final_response(result, job)
            self._send(job, response, final=True)  # every request gets its final flag, or Triton never frees it
        return on_event

    def _on_step(self, record: Any) -> None:
        """After each scheduler step (its thread): metrics, and requests whose client went away are cancelled (their
        slots are free at the next step). A queued request waits only while steps run, so it is seen here too."""
        if self.metrics is not None:
            self.metrics.set("queue", self.scheduler.queue_depth)
            self.metrics.set("running", self.scheduler.running)
            if record.decoded:
                self.metrics.inc("steps")
                self.metrics.inc("rows", len(record.decoded))
        now = time.monotonic()
        if now < self.next_cancel_check:  # each check is a message to the server per request: a few per second
            return
        self.next_cancel_check = now + 0.2
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            try:
                gone = job.sender.is_cancelled()
            except Exception:  # an older stub: cancellation shows as a failed send instead
                gone = False
            if gone and not job.handle.done:
                job.handle.cancel()

    def _run_group(self, group: list[Job], responses: list) -> None:
        results: list[Any] = []
        try:
            for event in self.generator.stream([j.ids for j in group], group[0].params, results):
                job = group[event.row]
                if job.stream and (event.text or event.token is not None):
                    self._send(job, self._token_response(event.text, event.token))
        except Exception as e:  # an engine failure fails this group's requests, not the server
            from adaskip.errors import AdaskipError

            error = _invalid(str(e)) if isinstance(e, AdaskipError) else _internal(f"{type(e).__name__}: {e}")
            pb_utils.Logger.log_error(f"adaskip: a batch of {len(group)} request(s) failed: {e!r}")
            for job in group:
                if self.decoupled:
                    self._send(job, pb_utils.InferenceResponse(error=error), final=True)
                else:
                    responses[job.index] = pb_utils.InferenceResponse(error=error)
            return
        for job, result in zip(group, results):
            response = self._final_response(result, job)
            if self.decoupled:
                self._send(job, response, final=True)
            else:
                responses[job.index] = response

    def finalize(self) -> None:
        if self.scheduler is not None:
            self.closing = True
            self.scheduler.stop()  # requests still in flight get a CANCELLED error with the final flag
            self.scheduler = None
            if self.metrics is not None:
                self.metrics.set("queue", 0)
                self.metrics.set("running", 0)
                self.metrics.close()
        self.runtime = self.generator = None
