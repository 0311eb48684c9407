"""In-flight batching: requests join and leave a running batch at every step, each with its own skip state.

The scheduler owns a pool of KV slots (one buffer per layer over `slots` rows of `slot_capacity` positions each;
the `ort` graph variant runs a forward over any range of them) and drives the step loop (adaskip/runtime/stepper.py).
Each step:

1. cancelled requests leave (their slot is free for this very step); queued requests take free slots (lowest
   first, so the decoding rows stay packed at the front of the pool);
2. one batched decode step for every row whose prompt is in (one forward per group of rows whose attention
   decisions agree, which is one forward under every AdaSkip plan); each row samples with its own params and
   random generator, checks its own stops, streams its text, and its SkipPolicy state learns its online FFNs;
3. prompt chunks of the rows still prefilling, oldest first, within what the step's token budget leaves after the
   decode rows (`step_tokens`), so a long prompt never freezes the running streams (chunked prefill as in
   Sarathi-Serve / vLLM). A row whose last chunk is in samples its first token and decodes from the next step.

Every step leaves a StepRecord (which requests decoded, which prompt chunks ran) that tests and metrics read.
`step()` is the unit (tests drive it directly); `start()` runs it on a background thread while there is work, and
`submit()` / `RequestHandle.cancel()` are safe from any thread. Greedy rows produce exactly their solo tokens
whatever joins or leaves: rows never mix (per-row masks, lengths and sampling state).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from adaskip.errors import AdaskipError, InputError
from adaskip.policy import SkipPolicy
from adaskip.runtime.engine import Engine
from adaskip.runtime.generate import (GenerationResult, SamplingParams, Sequence, TokenEvent, accept_rows,
                                      check_prompt, dtype_bytes)
from adaskip.runtime.stepper import Row, Stepper

log = logging.getLogger(__name__)


class QueueFull(AdaskipError):
    """The admission queue is at its limit: the client should retry later (HTTP 429)."""


class SchedulerClosed(AdaskipError):
    """The scheduler has been stopped and takes no more requests."""


@dataclass
class SchedulerOptions:
    slots: int = 8  # KV slots: requests decoding or prefilling at once
    slot_capacity: int = 2048  # positions per slot: a request's prompt + max_tokens must fit
    max_queue: int = 64  # requests waiting for a slot; one more is refused (QueueFull)
    # tokens per step: one per decoding row, the rest for prompt chunks. It bounds how long a step that carries a
    # chunk stalls every stream: 128 cut the worst token gap of 256 by ~45% at the same throughput on 2 CPU cores
    # (docs/serving.md, "The step's token budget")
    step_tokens: int = 128
    record_steps: int = 4096  # StepRecords kept (the newest)

    def validate(self, context: int | None = None) -> None:
        for name in ("slots", "slot_capacity", "step_tokens", "record_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise InputError(f"max_queue must be an integer >= 0; got {self.max_queue!r}")
        if self.slot_capacity < 2:
            raise InputError("slot_capacity must hold at least a one-token prompt and one new token")
        if context is not None and self.slot_capacity > context:
            raise InputError(f"slot_capacity {self.slot_capacity} exceeds the model's context of {context} tokens")
        if self.step_tokens <= self.slots:
            raise InputError(f"step_tokens ({self.step_tokens}) must exceed slots ({self.slots}): a prompt chunk has "
                             "to fit beside a decode step of every slot")


@dataclass(frozen=True)
class StepRecord:
    index: int
    decoded: tuple[int, ...]  # request ids that got a decode step
    prefilled: tuple[tuple[int, int, int], ...]  # (request id, first, stop) of each prompt chunk that ran
    admitted: tuple[int, ...]
    finished: tuple[int, ...]
    cancelled: tuple[int, ...]
    forwards: int  # engine forwards this step
    filler_rows: int  # rows a decode forward carried that were not decoding (gaps in the slot range)
    skipped_sublayers: int  # sum over decoded rows of the sublayers their mask skipped
    online_skips: int  # of those, the rows' online FFN skips
    seconds: float


Listener = Callable[["RequestHandle", "TokenEvent | None"], None]


@dataclass(eq=False)
class RequestHandle:
    """A submitted request: cancel it, wait for its result. The listener (if any) is called on the scheduler's
    thread with each TokenEvent and finally with None once `result` is set; it must not block."""

    id: int
    prompt: list[int]
    params: SamplingParams
    truncated: bool
    listener: Listener | None
    submitted: float
    result: GenerationResult | None = None
    error: str | None = None  # set when the engine failed under this request
    _cancelled: bool = False
    _done: threading.Event = field(default_factory=threading.Event)
    _scheduler: "Scheduler | None" = None

    def cancel(self) -> None:
        """The slot is freed at the next step (a queued request never takes one)."""
        self._cancelled = True
        if self._scheduler is not None:
            self._scheduler._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise RuntimeError(self.error)
        assert self.result is not None
        return self.result


@dataclass(eq=False)
class _Active:
    handle: RequestHandle
    row: Row
    seq: Sequence
    fed: int = 0  # prompt tokens in the slot

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.handle.prompt)


class Scheduler:
    def __init__(self, engine: Engine, policy: SkipPolicy, options: SchedulerOptions | None = None,
                 tokenizer: Any = None, eos_token_ids: tuple[int, ...] = (),
                 on_step: Callable[[StepRecord], None] | None = None):
        self.options = options or SchedulerOptions()
        spec = engine.spec
        self.options.validate(spec.max_position_embeddings)
        self.stepper = Stepper(engine, policy)
        self.stepper._slot_engine()  # refuse engines without slots now, not at the first request
        self.engine, self.policy, self.tokenizer = engine, policy, tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.on_step = on_step
        opts = self.options
        self.pool = self.stepper.new_cache(opts.slots, opts.slot_capacity)
        self._row_kv_per_pos = self.pool.nbytes() // (opts.slots * opts.slot_capacity)
        self._full_kv_per_pos = spec.kv_bytes_per_token(spec.num_layers, dtype_bytes(engine))
        self._free = list(range(opts.slots))  # a heap: the lowest free slot first
        self._active: list[_Active] = []  # admission order
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._steps = 0
        self.records: collections.deque[StepRecord] = collections.deque(maxlen=opts.record_steps)

    # -- what clients call (any thread) -------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams | None = None,
               listener: Listener | None = None) -> RequestHandle:
        """Queues a request (InputError if it cannot be served, QueueFull at the queue's limit)."""
        params = params or SamplingParams()
        params.validate()
        ids, truncated = check_prompt(list(prompt), params, self.options.slot_capacity, self.engine.spec.vocab_size,
                                      where="a KV slot")
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the scheduler is stopped")
            if len(self._queue) >= self.options.max_queue:
                raise QueueFull(f"the admission queue is full ({self.options.max_queue} requests waiting); retry "
                                "later")
            handle = RequestHandle(next(self._ids), ids, params, truncated, listener, time.perf_counter(),
                                   _scheduler=self)
            self._queue.append(handle)
            self._cond.notify()
        return handle

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests holding a slot (decoding or prefilling)."""
        return len(self._active)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._active

    # -- the step --------------------------------------------------------------------------------------------------
    def step(self) -> StepRecord | None:
        """One scheduling step; None when there was nothing to do. Call from one thread only."""
        t0 = time.perf_counter()
        cancelled = self._drop_cancelled()
        admitted = self._admit()
        if not self._active and not cancelled:
            return None
        finished: list[int] = []
        decoded, forwards, fillers, skipped, online = self._decode(finished)
        prefilled = self._prefill(self.options.step_tokens - len(decoded), finished)
        record = StepRecord(index=self._steps, decoded=tuple(decoded), prefilled=tuple(prefilled),
                            admitted=tuple(admitted), finished=tuple(finished), cancelled=tuple(cancelled),
                            forwards=forwards + len(prefilled), filler_rows=fillers, skipped_sublayers=skipped,
                            online_skips=online, seconds=time.perf_counter() - t0)
        self._steps += 1
        self.records.append(record)
        if self.on_step is not None:
            self.on_step(record)
        return record

    def _drop_cancelled(self) -> list[int]:
        out = []
        with self._cond:
            for handle in [h for h in self._queue if h._cancelled]:
                self._queue.remove(handle)
                handle.result = GenerationResult(prompt_tokens=len(handle.prompt), finish_reason="cancelled",
                                                 truncated_prompt=handle.truncated)
                out.append(handle.id)
                self._notify(handle, None)
                handle._done.set()
        for act in [a for a in self._active if a.handle._cancelled]:
            act.seq.result.finish_reason = "cancelled"
            self._finish(act)
            out.append(act.handle.id)
        return out

    def _admit(self) -> list[int]:
        out = []
        with self._cond:
            while self._free and self._queue:
                handle = self._queue.popleft()
                slot = heapq.heappop(self._free)
                self.pool.release(slot)
                row = Row(slot=slot, state=self.policy.new_request())
                stop_ids = set(self.eos_token_ids if handle.params.stop_token_ids is None
                               else handle.params.stop_token_ids)
                seq = Sequence(row, handle.prompt, handle.truncated, handle.params, stop_ids, self._detokenize,
                               handle.submitted)
                self._active.append(_Active(handle, row, seq))
                out.append(handle.id)
        return out

    def _decode(self, finished: list[int]) -> tuple[list[int], int, int, int, int]:
        rows = [a for a in self._active if a.decoding]
        groups: dict[tuple[int, ...], list[_Active]] = {}
        for act in rows:
            groups.setdefault(self.stepper.attention_key(act.row), []).append(act)
        fillers = skipped = online = 0
        for group in groups.values():
            group.sort(key=lambda a: a.row.slot)
            slots = [a.row.slot for a in group]
            fillers += max(slots) - min(slots) + 1 - len(slots)
            tokens = torch.tensor([a.seq.last_token for a in group])
            out = self.stepper.decode_slots([a.row for a in group], tokens, self.pool)
            events = accept_rows([a.seq for a in group], out.logits, False, time.perf_counter())
            for act, event in zip(group, events):
                mask = act.row.mask
                skipped += len(mask.skipped)
                online += sum(1 for j in mask.skipped if j in act.row.state.online)
                act.seq.observe_step()
                self._after_token(act, event, finished)
        return [a.handle.id for a in rows], len(groups), fillers, skipped, online

    def _prefill(self, budget: int, finished: list[int]) -> list[tuple[int, int, int]]:
        chunks = []
        for act in [a for a in self._active if not a.decoding]:
            if budget <= 0:
                break
            prompt = act.handle.prompt
            first = act.fed
            stop = min(len(prompt), first + budget)
            out = self.stepper.prefill_chunk(act.row, prompt[first:stop], self.pool)
            act.fed = stop
            budget -= stop - first
            chunks.append((act.handle.id, first, stop))
            if act.decoding:  # the prompt is in: its first token
                event = act.seq.accept(out.logits[0], True, time.perf_counter())
                self._after_token(act, event, finished)
        return chunks

    def _after_token(self, act: _Active, event: TokenEvent | None, finished: list[int]) -> None:
        if event is not None:
            self._notify(act.handle, event)
        if act.seq.done:
            finished.append(act.handle.id)
            self._finish(act)

    def _finish(self, act: _Active) -> None:
        last = act.seq.finish()
        result = act.seq.result
        positions = result.prompt_tokens + act.handle.params.max_new_tokens
        result.kv_bytes, result.kv_bytes_full = self._row_kv_per_pos * positions, self._full_kv_per_pos * positions
        self._active.remove(act)
        self.pool.release(act.row.slot)
        with self._cond:
            heapq.heappush(self._free, act.row.slot)
        act.handle.result = result
        if last is not None and result.finish_reason != "cancelled":
            self._notify(act.handle, last)
        self._notify(act.handle, None)
        act.handle._done.set()

    def _notify(self, handle: RequestHandle, event: TokenEvent | None) -> None:
        if handle.listener is None:
            return
        try:
            handle.listener(handle, event)
        except Exception:  # a broken client must not stop the others: it is cancelled instead
            log.exception("listener of request %d failed; cancelling it", handle.id)
            handle._cancelled = True

    def _detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""

    # -- the background loop ---------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._loop, name="adaskip-scheduler", daemon=True)
        self._thread.start()
        return self

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and self.idle:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # an engine failure fails the requests in flight, not the server
                log.exception("scheduler step failed")
                self._fail_active(f"the engine failed: {e}")

    def _fail_active(self, message: str) -> None:
        for act in list(self._active):
            act.handle.error = message
            act.seq.result.finish_reason = "error"
            self._finish(act)

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the loop; requests still queued or running finish as cancelled."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            queued = list(self._queue)
        for handle in queued:
            handle._cancelled = True
        for act in self._active:
            act.handle._cancelled = True
        self._drop_cancelled()

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
