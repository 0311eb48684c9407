"""Generator: prompts -> tokens with sampling, stop conditions, streaming and batching.

It owns the KV cache and, every step, asks the SkipPolicy for each request's mask, passes it to the engine and
feeds the engine's similarity stats back to the policy. It never decides a skip itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from adaskip.errors import InputError
from adaskip.policy import Mask, RequestState, SkipPolicy
from adaskip.runtime.engine import Engine, StepOutput
from adaskip.runtime.stops import StopMatcher


# Documented ranges (README "Sampling options"): a request outside them is refused, never run.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 256  # per stop string
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0  # or 0 (greedy): below, logits / temperature overflows to inf/NaN
MAX_SEED = 2**64 - 1


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
        if self.truncate not in ("error", "middle"):
            raise InputError(f"truncate must be 'error' or 'middle'; got {self.truncate!r}")


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" | "length"
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


def stack_masks(masks: list[Mask]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-request masks -> the engine's skip [B, 2L] and scale [B, 2L] tensors."""
    return (torch.tensor([m.skip for m in masks], dtype=torch.bool),
            torch.tensor([m.scales for m in masks], dtype=torch.float32))


class Generator:
    def __init__(self, engine: Engine, policy: SkipPolicy, tokenizer: Any = None,
                 eos_token_ids: tuple[int, ...] = ()):
        self.engine = engine
        self.policy = policy
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.context_len = engine.spec.max_position_embeddings

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
        out = []
        budget = self.context_len - params.max_new_tokens
        if budget < 1:
            raise InputError(f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in the model's "
                             f"context of {self.context_len} tokens")
        vocab = self.engine.spec.vocab_size
        for n, ids in enumerate(prompts):
            if len(ids) == 0:
                raise InputError(f"prompt {n} is empty")
            if min(ids) < 0 or max(ids) >= vocab:
                raise InputError(f"prompt {n} has token ids outside the vocabulary (0..{vocab - 1})")
            if len(ids) <= budget:
                out.append((list(ids), False))
            elif params.truncate == "middle":
                head = budget // 2
                out.append((list(ids[:head]) + list(ids[len(ids) - (budget - head):]), True))
            else:
                raise InputError(
                    f"prompt {n} has {len(ids)} tokens; with max_new_tokens {params.max_new_tokens} that exceeds the "
                    f"model's context of {self.context_len} tokens (shorten it, lower max_new_tokens, or truncate "
                    f"the middle with --truncate middle)")
        return out

    def _run(self, prompts: list[list[int]], params: SamplingParams,
             results: list[GenerationResult]) -> Iterator[TokenEvent]:
        params.validate()
        checked = self._check_prompts(prompts, params)
        policy, engine, spec = self.policy, self.engine, self.engine.spec
        batch = len(checked)
        width = max(len(ids) for ids, _ in checked)
        ids = torch.zeros(batch, width, dtype=torch.long)
        valid = torch.zeros(batch, width, dtype=torch.bool)
        for b, (p, _) in enumerate(checked):  # left padding: every row's last prompt token is at position -1
            ids[b, width - len(p):] = torch.tensor(p)
            valid[b, width - len(p):] = True
        stop_ids = set(self.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        rng = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

        states: list[RequestState] = [policy.new_request() for _ in range(batch)]
        results[:] = [GenerationResult(prompt_tokens=len(p), truncated_prompt=t) for p, t in checked]
        capacity = width + params.max_new_tokens
        cache = engine.new_cache(batch, capacity, policy.layout.cached_layers)
        # KV bytes per position of one row, with and without the skipped attention; each request is charged for its
        # own prompt + max_new_tokens positions, not the padded batch width, so it reports what it would alone
        row_kv_per_pos = cache.nbytes() // (batch * capacity)
        full_kv_per_pos = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * _dtype_bytes(engine)

        t0 = time.perf_counter()
        prefill = [policy.prefill_mask(s) for s in states]
        skip, scales = stack_masks(prefill)
        out = engine.prefill(ids, valid, cache, skip, scales, want_stats=False)  # online learning is decode-only
        done = [False] * batch
        texts = [""] * batch
        detok = [_Detokenizer(self._decode) for _ in range(batch)]
        stops = [StopMatcher(params.stop_strings) for _ in range(batch)]
        cut_by_string: set[int] = set()
        step = 0
        while True:
            tokens = self._sample(out, params, rng)
            now = time.perf_counter()
            for b in range(batch):
                if done[b]:
                    continue
                r = results[b]
                tok = int(tokens[b])
                if step == 0:
                    r.ttft_s = now - t0
                    r.prefill_skipped = prefill[b].skipped
                else:
                    r.decode_s = now - t0 - r.ttft_s
                if tok in stop_ids:
                    done[b], r.finish_reason = True, "stop"
                    continue
                r.tokens.append(tok)
                text = detok[b].add(r.tokens)
                cut, held = stops[b].feed(text)  # linear in the text, however many stop strings
                if cut is not None:
                    text = text[:cut]
                    done[b], r.finish_reason = True, "stop"
                    cut_by_string.add(b)
                else:  # hold back what could be the start of a stop string
                    text = text[:len(text) - held]
                delta = text[len(texts[b]):]
                texts[b] = max(texts[b], text, key=len)
                yield TokenEvent(row=b, token=tok, text=delta)
                if len(r.tokens) >= params.max_new_tokens:
                    done[b] = True
            if all(done):
                break
            masks = [policy.decode_mask(s) for s in states]
            skip, scales = stack_masks(masks)
            out = engine.decode(tokens, cache, skip, scales,
                                want_stats=any(policy.wants_decode_stats(s) for s in states))
            sims, ratios = out.similarity.tolist(), out.norm_ratio.tolist()
            for b, s in enumerate(states):
                policy.observe_decode(s, sims[b], ratios[b])
                if not done[b]:
                    results[b].decode_skipped_offline = [j for j in masks[b].skipped if j not in s.online]
            step += 1

        for b, r in enumerate(results):
            r.text = texts[b] if b in cut_by_string else self._decode(r.tokens)
            if len(r.text) > len(texts[b]) and r.text.startswith(texts[b]):  # flush what was held back
                yield TokenEvent(row=b, token=None, text=r.text[len(texts[b]):])
            r.online_skipped = sorted(states[b].online)
            positions = r.prompt_tokens + params.max_new_tokens
            r.kv_bytes, r.kv_bytes_full = row_kv_per_pos * positions, full_kv_per_pos * positions

    @staticmethod
    def _sample(out: StepOutput, params: SamplingParams, rng: torch.Generator | None) -> torch.Tensor:
        logits = out.logits.float()
        if params.temperature == 0:
            return logits.argmax(-1)
        logits = logits / params.temperature
        if params.top_k > 0:
            kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest set reaching top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return torch.multinomial(logits.softmax(-1), 1, generator=rng).squeeze(-1)


def _dtype_bytes(engine: Engine) -> int:
    return torch.empty(0, dtype=getattr(engine, "dtype", torch.float32)).element_size()
