"""Generator: prompts -> tokens with sampling, stop conditions, streaming and batching.

It owns the KV cache and the rows of the batch; each forward goes through the step loop (adaskip/runtime/stepper.py),
which asks the SkipPolicy for each row's mask and feeds the engine's statistics back. Per row, a Sequence samples
with the request's own params and random generator, handles stop conditions and streams text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from adaskip.errors import InputError
from adaskip.policy import SkipPolicy
from adaskip.runtime.engine import Engine
from adaskip.runtime.stepper import Row, Stepper
from adaskip.runtime.stops import StopMatcher


# Documented ranges (README "Sampling options"): a request outside them is refused, never run.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 256  # per stop string
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0  # or 0 (greedy): below, logits / temperature overflows to inf/NaN
MAX_SEED = 2**64 - 1
TRUNCATE_MODES = ("error", "middle")  # a prompt over the context: refuse it, or keep its beginning and end


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's end-of-sequence tokens
    stop_strings: tuple[str, ...] = ()
    truncate: str = "error"  # "error" or "middle" (keep the prompt's beginning and end, as the reference does)

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer; got {self.max_new_tokens!r}")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise InputError(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and "
                             f"{MAX_TEMPERATURE:g}; got {self.temperature}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be between 0 and 2**64-1; got {self.seed}")
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise InputError(f"at most {MAX_STOP_STRINGS} stop strings; got {len(self.stop_strings)}")
        for stop in self.stop_strings:
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise InputError(f"a stop string must have 1 to {MAX_STOP_CHARS} characters; got {len(stop)}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0; got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.truncate not in TRUNCATE_MODES:
            raise InputError(f"truncate must be 'error' or 'middle'; got {self.truncate!r}")


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" | "length" | "cancelled" (the scheduler: the client went away)
    truncated_prompt: bool = False
    ttft_s: float = 0.0
    decode_s: float = 0.0
    prefill_skipped: list[int] = field(default_factory=list)
    decode_skipped_offline: list[int] = field(default_factory=list)  # at the last decode step
    online_skipped: list[int] = field(default_factory=list)  # FFNs this request added online
    kv_bytes: int = 0  # allocated for this request's row
    kv_bytes_full: int = 0  # what a model skipping nothing would allocate

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens, "new_tokens": len(self.tokens), "finish_reason": self.finish_reason,
            "ttft_s": round(self.ttft_s, 4), "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "prefill_skipped": self.prefill_skipped, "decode_skipped_offline": self.decode_skipped_offline,
            "decode_skipped_online": self.online_skipped, "kv_bytes": self.kv_bytes,
            "kv_bytes_saved": self.kv_bytes_full - self.kv_bytes, "truncated_prompt": self.truncated_prompt,
        }


@dataclass
class TokenEvent:
    row: int
    token: int | None  # None: a final flush of text held back while it could have been the start of a stop string
    text: str  # newly decoded text (may be empty while a multi-byte character is incomplete)


class _Detokenizer:
    """Incremental detokenization: each step decodes only the tokens since the last stable point, not the whole
    output (which would make a long generation quadratic). The new text is what decoding the window adds to
    decoding its already-emitted part, so tokenizers that drop a leading space at a sequence start stay exact."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.text = ""
        self._prefix = self._read = 0

    def add(self, tokens: list[int]) -> str:
        """Text of all `tokens` so far (the last token may still be waiting for the rest of a character)."""
        new = self._decode(tokens[self._prefix:])
        if new.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return self.text
        self.text += new[len(self._decode(tokens[self._prefix:self._read])):]
        self._prefix, self._read = self._read, len(tokens)
        return self.text


class Sequence:
    """One request's generation state beside its Row: sampling (its own params and random generator), stop
    handling, incremental text, timings and its result. A scheduler keeps one per running request."""

    def __init__(self, row: Row, prompt: list[int], truncated: bool, params: SamplingParams,
                 stop_ids: set[int], decode: Callable[[list[int]], str], t0: float):
        self.row, self.params, self.stop_ids, self._decode, self.t0 = row, params, stop_ids, decode, t0
        self.result = GenerationResult(prompt_tokens=len(prompt), truncated_prompt=truncated)
        self.rng = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.detok = _Detokenizer(decode)
        self.text = ""  # emitted so far
        self.done = False
        self.cut_by_string = False
        self.last_token = 0
        self.stops = StopMatcher(params.stop_strings)  # linear in the text, however many stop strings

    def accept(self, logits: torch.Tensor, first: bool, now: float) -> TokenEvent | None:
        """Sample this row's next token from its logits [vocab]; None when the token ends the request unseen."""
        return self.take(int(sample(logits[None], self.params, self.rng)[0]), first, now)

    def take(self, tok: int, first: bool, now: float) -> TokenEvent | None:
        """This row's next token, sampled already (`accept_rows`); None when it ends the request unseen."""
        self.last_token = tok
        r = self.result
        if first:
            r.ttft_s = now - self.t0
            r.prefill_skipped = sorted(self.row.mask.skipped) if self.row.mask is not None else []
        else:
            r.decode_s = now - self.t0 - r.ttft_s
        if tok in self.stop_ids:
            self.done, r.finish_reason = True, "stop"
            return None
        r.tokens.append(tok)
        text = self.detok.add(r.tokens)
        cut, held = self.stops.feed(text)
        if cut is not None:
            text = text[:cut]
            self.done, r.finish_reason, self.cut_by_string = True, "stop", True
        else:  # hold back what could be the start of a stop string
            text = text[:len(text) - held]
        delta = text[len(self.text):]
        self.text = max(self.text, text, key=len)
        if len(r.tokens) >= self.params.max_new_tokens:
            self.done = True
        return TokenEvent(row=self.row.slot, token=tok, text=delta)

    def observe_step(self) -> None:
        """After a decode step: what this row skipped offline in it (its online FFNs are reported at the end)."""
        if not self.done and self.row.mask is not None:
            self.result.decode_skipped_offline = sorted(j for j in self.row.mask.skipped if j not in self.row.state.online)

    def finish(self) -> TokenEvent | None:
        """Final text and online skips; a last event with text held back while it could start a stop string."""
        r = self.result
        r.text = self.text if self.cut_by_string else self._decode(r.tokens)
        r.online_skipped = sorted(self.row.state.online)
        if len(r.text) > len(self.text) and r.text.startswith(self.text):
            return TokenEvent(row=self.row.slot, token=None, text=r.text[len(self.text):])
        return None


class Generator:
    def __init__(self, engine: Engine, policy: SkipPolicy, tokenizer: Any = None,
                 eos_token_ids: tuple[int, ...] = ()):
        self.engine = engine
        self.policy = policy
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.context_len = engine.spec.max_position_embeddings
        self.stepper = Stepper(engine, policy)

    # -- text helpers ------------------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt is empty")
        if self.tokenizer is None:
            raise InputError("this engine has no tokenizer: pass token ids")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise InputError("this model has no chat template; drop --chat")
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True, tokenize=False)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""

    # -- generation --------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[GenerationResult]:
        results: list[GenerationResult] = []
        for event in self._run(prompts, params or SamplingParams(), results):
            pass
        return results

    def stream(self, prompts: list[list[int]], params: SamplingParams | None = None,
               results: list[GenerationResult] | None = None) -> Iterator[TokenEvent]:
        """Yields each new token as it is produced; `results` (if given) is filled with the final results."""
        return self._run(prompts, params or SamplingParams(), results if results is not None else [])

    def _check_prompts(self, prompts: list[list[int]], params: SamplingParams) -> list[tuple[list[int], bool]]:
        if not prompts:
            raise InputError("no prompts given")
        return [check_prompt(ids, params, self.context_len, self.engine.spec.vocab_size, f"prompt {n}")
                for n, ids in enumerate(prompts)]

    def _run(self, prompts: list[list[int]], params: SamplingParams,
             results: list[GenerationResult]) -> Iterator[TokenEvent]:
        params.validate()
        checked = self._check_prompts(prompts, params)
        engine, spec, stepper = self.engine, self.engine.spec, self.stepper
        batch = len(checked)
        width = max(len(ids) for ids, _ in checked)
        ids = torch.zeros(batch, width, dtype=torch.long)
        valid = torch.zeros(batch, width, dtype=torch.bool)
        for b, (p, _) in enumerate(checked):  # left padding: every row's last prompt token is at position -1
            ids[b, width - len(p):] = torch.tensor(p)
            valid[b, width - len(p):] = True
        stop_ids = set(self.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids)

        capacity = width + params.max_new_tokens
        cache = stepper.new_cache(batch, capacity)
        # KV bytes per position of one row, with and without the skipped attention; each request is charged for its
        # own prompt + max_new_tokens positions, not the padded batch width, so it reports what it would alone
        row_kv_per_pos = cache.nbytes() // (batch * capacity)
        full_kv_per_pos = spec.kv_bytes_per_token(spec.num_layers, dtype_bytes(engine))

        t0 = time.perf_counter()
        rows = stepper.new_rows(batch)
        seqs = [Sequence(row, p, t, params, stop_ids, self._decode, t0) for row, (p, t) in zip(rows, checked)]
        results[:] = [s.result for s in seqs]
        out = stepper.prefill(rows, ids, valid, cache)
        first = True
        while True:
            live = [b for b, s in enumerate(seqs) if not s.done]
            for event in accept_rows([seqs[b] for b in live], out.logits[live], first, time.perf_counter()):
                if event is not None:
                    yield event
            first = False
            if all(s.done for s in seqs):
                break
            out = stepper.decode(rows, torch.tensor([s.last_token for s in seqs]), cache)
            for s in seqs:
                s.observe_step()

        for s in seqs:
            event = s.finish()
            if event is not None:
                yield event
            positions = s.result.prompt_tokens + params.max_new_tokens
            s.result.kv_bytes, s.result.kv_bytes_full = row_kv_per_pos * positions, full_kv_per_pos * positions


def check_prompt(ids: list[int], params: SamplingParams, context: int, vocab: int, name: str = "prompt",
                 where: str = "the model's context") -> tuple[list[int], bool]:
    """A prompt that fits `context` positions with its max_new_tokens (truncated in the middle when the params ask
    for it), and whether it was truncated; InputError otherwise."""
    budget = context - params.max_new_tokens
    if budget < 1:
        raise InputError(f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in {where} of "
                         f"{context} tokens")
    if len(ids) == 0:
        raise InputError(f"{name} is empty")
    if min(ids) < 0 or max(ids) >= vocab:
        raise InputError(f"{name} has token ids outside the vocabulary (0..{vocab - 1})")
    if len(ids) <= budget:
        return list(ids), False
    if params.truncate == "middle":
        head = budget // 2
        return list(ids[:head]) + list(ids[len(ids) - (budget - head):]), True
    raise InputError(
        f"{name} has {len(ids)} tokens; with max_new_tokens {params.max_new_tokens} that exceeds {where} of "
        f"{context} tokens (shorten it, lower max_new_tokens, or truncate the middle with --truncate middle)")


def sample(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab] under one request's sampling params (greedy at temperature 0)."""
    logits = logits.float()
    if params.temperature == 0:
        return _greedy(logits)
    logits = logits / _temperatures([params.temperature] * len(logits))
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return _inverse_cdf(logits, torch.rand((len(logits), 1), generator=rng, dtype=torch.float64))


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first maximum [B]: numpy's argmax (the same choice as torch's), ~8x less overhead on a decode step."""
    return torch.from_numpy(np.asarray(logits.detach().numpy().argmax(-1)))


def _temperatures(values: list[float]) -> torch.Tensor:
    """[B, 1] divisors: one tensor division for a row alone and in a batch (a Python scalar divisor takes another
    path in torch, which may round differently), so a row samples the same token either way."""
    return torch.tensor(values, dtype=torch.float32)[:, None]


def _inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Tokens [B] drawn from softmax(logits [B, vocab]) by inverse CDF with one uniform [B, 1] (float64) per row.
    torch.multinomial took ~1.1 ms a row over a 49k vocabulary here, a fifth of a 16-row serving step
    (docs/serving.md); this takes ~0.24 ms."""
    cdf = logits.softmax(-1).double().cumsum(-1)
    total = cdf[:, -1:].contiguous()  # searchsorted copies a strided column anyway (and warns)
    u = uniforms * total
    # the first token whose cumulative probability exceeds u: never one of probability 0 (its cdf equals the one
    # before it); if u rounded up to the total, the last token with any probability
    picked = torch.searchsorted(cdf, u, right=True)
    last = torch.searchsorted(cdf, total, right=False)
    return torch.where(picked < cdf.shape[-1], picked, last).squeeze(-1)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                rngs: list[torch.Generator | None]) -> list[int]:
    """Next tokens of rows with their own sampling params and generators (a serving batch): each row's token is the
    one `sample` gives it alone (the same uniform from its generator, the same arithmetic per row), but the greedy
    rows and the rows sampled at a plain temperature each go through one batched call (per-row calls cost a 16-row
    serving step ~5 ms of Python on 2 cores; docs/serving.md); rows with top_k / top_p go one by one."""
    logits = logits.float()
    tokens = [0] * len(params)
    greedy = [b for b, p in enumerate(params) if p.temperature == 0]
    plain = [b for b, p in enumerate(params) if p.temperature != 0 and p.top_k == 0 and p.top_p >= 1.0]
    if greedy:
        for b, t in zip(greedy, _greedy(logits[greedy]).tolist()):
            tokens[b] = t
    if plain:
        temps = _temperatures([params[b].temperature for b in plain])
        uniforms = torch.cat([torch.rand((1, 1), generator=rngs[b], dtype=torch.float64) for b in plain])
        for b, t in zip(plain, _inverse_cdf(logits[plain] / temps, uniforms).tolist()):
            tokens[b] = t
    batched = set(greedy) | set(plain)
    for b in (b for b in range(len(params)) if b not in batched):  # in row order: unseeded rows share torch's RNG
        tokens[b] = int(sample(logits[b:b + 1], params[b], rngs[b])[0])
    return tokens


def accept_rows(seqs: list[Sequence], logits: torch.Tensor, first: bool, now: float) -> list[TokenEvent | None]:
    """Every row's next token from its logits (row b of `logits` is seqs[b]'s), sampled together; one event or None
    per row, as `Sequence.accept` gives."""
    if not seqs:
        return []
    tokens = sample_rows(logits, [s.params for s in seqs], [s.rng for s in seqs])
    return [s.take(t, first, now) for s, t in zip(seqs, tokens)]


def dtype_bytes(engine: Engine) -> int:
    """Bytes per element of the engine's KV cache."""
    return torch.empty(0, dtype=getattr(engine, "dtype", torch.float32)).element_size()
