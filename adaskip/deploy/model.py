"""Triton Python-backend model serving an adaskip engine dir (copied into <repo>/<model>/1/model.py).

Each execute() gets the requests Triton's dynamic batcher gathered. Greedy requests with the same max_tokens and
stop words run as one left-padded Generator batch (every row equals its solo run, online skip state is per row);
sampled requests run alone so that a seed gives the same tokens however requests arrive. A model instance serves one
batch at a time; more instances (processes) serve batches in parallel.

Decoupled models stream: with `stream` true, one response per generated token (text delta + token id) and a final
response with the skip statistics; otherwise one response with everything.
"""

from __future__ import annotations

import json
import math
import os
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
    sender: Any = None  # decoupled models: the request's response sender
    alive: bool = True  # false once sending failed (client gone)


def _invalid(message: str):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


def _internal(message: str):
    code = getattr(pb_utils.TritonError, "INTERNAL", None)
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


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
        env_threads = os.environ.get("ADASKIP_THREADS", "")
        threads = int(params.get("threads") or 0) or (int(env_threads) if env_threads.isdigit() else 0)
        if threads:
            torch.set_num_threads(threads)  # sampling ops; ONNX Runtime gets the same count below
        if params.get("adaskip_version", __version__) != __version__:
            pb_utils.Logger.log_warn(f"model deployed with adaskip {params['adaskip_version']}, serving with "
                                     f"{__version__}: redeploy if requests fail")
        from adaskip.runtime import generate
        from adaskip.runtime.generate import SamplingParams
        from adaskip.runtime.loader import load_runtime

        self.max_stops, self.max_stop_chars = generate.MAX_STOP_STRINGS, generate.MAX_STOP_CHARS

        self.SamplingParams = SamplingParams
        self.runtime = load_runtime(engine, threads=threads or None)
        self.generator = self.runtime.generator
        self.context = self.generator.context_len
        self.max_input_bytes = int(params.get("max_input_bytes") or 0) or 32 * self.context
        pb_utils.Logger.log_info(f"adaskip: serving {engine} ({self.runtime.engine_dir.backend} backend, plan "
                                 f"{self.runtime.policy.plan.method} K={len(self.runtime.policy.plan.skip)}, "
                                 f"{'decoupled' if self.decoupled else 'request/response'}, "
                                 f"threads {threads or 'default'})")

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
        if max_tokens >= self.context:
            raise RequestError(f"max_tokens {max_tokens} exceeds the model's context of {self.context} tokens")
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
        if len(ids) + max_tokens > self.context:
            raise RequestError(f"the prompt has {len(ids)} tokens; with max_tokens {max_tokens} that exceeds the "
                               f"model's context of {self.context} tokens")
        return ids, params, stream

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

    def _send(self, job: Job, response: Any, final: bool = False) -> None:
        if not job.alive:
            return
        try:
            job.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)
        except Exception as e:  # the client went away: finish the batch for the others
            job.alive = False
            pb_utils.Logger.log_warn(f"adaskip: cannot send a response ({e}); dropping that request's output")

    # -- execution ---------------------------------------------------------------------------------------------
    def execute(self, requests: list) -> list | None:
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
        self.runtime = self.generator = None
