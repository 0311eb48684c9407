"""Long-context task generators: RULER-style retrieval, summarization and language modelling on real text.

Everything is generated from the built-in corpus (CPython's `pydoc_data` language-reference topics, PSF License,
shipped with every Python) and a seed, so a task set is identical on every machine and nothing is downloaded.
Prompts are assembled at the token level, so a sample is exactly `context` tokens long.

Corpus regions (by paragraph, in the corpus order): the first 45% hold the default calibration windows (20 x 2048
tokens at most), tasks draw their documents from 45%-85%, and held-out windows (compensation study) from 85%-100%:
no evaluation text is calibration text.

A sample is one document (`prefix`, shared by its queries so that its K/V can be reused) plus one or more queries
(`suffix` token ids appended to it). Retrieval queries are scored by exact match of the generated answer; the
summary query by ROUGE-L against the full model's own output; the LM continuation (`target`) is teacher-forced.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from adaskip.calibrate.compensation import Probe
from adaskip.calibrate.corpus import leading_special_tokens, builtin_text
from adaskip.errors import InputError
from adaskip.model.builtin import BUILTIN_MODELS

TASKS = ("passkey", "multikey", "kv", "summary")  # "summary" samples also carry the LM continuation
RETRIEVAL = ("passkey", "multikey", "kv")
# questions one document of each retrieval task asks (the generators' defaults; a test keeps them in step)
QUESTIONS_PER_DOCUMENT = {"passkey": 1, "multikey": 4, "kv": 3}
TASK_REGION = (0.45, 0.85)
HELDOUT_REGION = (0.85, 1.0)
MIN_CONTEXT = 128
ANSWER_TOKENS = 8  # room for a retrieval answer (a 5-digit number) after its prompt: each task's max_new_tokens

# Needle keys: short common words the tokenizer keeps whole, so the task tests retrieval, not spelling.
WORDS = ("apple", "river", "candle", "tiger", "violin", "marble", "pepper", "falcon", "harbor", "lemon", "rocket",
         "saddle", "tulip", "walnut", "anchor", "bishop", "copper", "dragon", "forest", "garden", "hammer", "island",
         "jacket", "kettle", "ladder", "meadow", "needle", "orange", "parrot", "quartz", "rabbit", "silver",
         "timber", "velvet", "window", "yellow", "zebra", "button", "castle", "dollar")


@dataclass
class Query:
    suffix: list[int]  # appended after the sample's prefix; ends where the model starts answering
    answer: str = ""  # retrieval: the expected answer ("" for the summary)
    key: str = ""


@dataclass
class Sample:
    task: str
    context: int  # requested prompt length in tokens (every query's prefix + suffix is exactly this long)
    seed: int
    index: int
    prefix: list[int]
    queries: list[Query]
    max_new_tokens: int
    target: list[int] = field(default_factory=list)  # LM: real continuation tokens, teacher-forced after prefix
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.task}-{self.context}-s{self.seed}-{self.index}"


@lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    return tuple(p.strip() for p in re.split(r"\n\s*\n", builtin_text()) if p.strip())


def region_paragraphs(region: tuple[float, float]) -> list[str]:
    """Paragraphs whose start lies in the `region` fraction of the corpus (by characters)."""
    paras = _paragraphs()
    total = sum(len(p) for p in paras)
    out, pos = [], 0
    for p in paras:
        if region[0] * total <= pos < region[1] * total:
            out.append(p)
        pos += len(p)
    return out


class _Encoder:
    """Token-level assembly helpers around one tokenizer. `chat`: wrap prompts in the chat template (default: when
    the tokenizer has one); plain prompts end in "Answer:", which suits base models."""

    def __init__(self, tokenizer: Any, chat: bool | None = None):
        self.tok = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_template:
            raise InputError("chat-formatted prompts need a tokenizer with a chat template")
        self.chat = has_template if chat is None else chat
        if self.chat:
            marker = "\x00DOC\x00"
            text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                                 tokenize=False)
            self.head, self.tail = text.split(marker)
            self.lead: list[int] = []
        else:  # a base model: plain text with the tokenizer's own leading special tokens (e.g. BOS)
            self.head, self.tail = "", "\n\nAnswer:"
            self.lead = leading_special_tokens(tokenizer)

    def enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    def paragraph_stream(self, rng: random.Random, region: tuple[float, float] = TASK_REGION):
        """Token ids of consecutive region paragraphs from a random start (wrapping), each ending in a blank line."""
        paras = region_paragraphs(region)
        if not paras:
            raise InputError("the built-in corpus region is empty")
        start = rng.randrange(len(paras))
        for n in range(len(paras) * 4):
            yield self.enc(paras[(start + n) % len(paras)] + "\n\n")
        raise InputError("the built-in corpus is too short for the requested context")

    def filler(self, rng: random.Random, n: int, region: tuple[float, float] = TASK_REGION) -> tuple[list[int], list[int]]:
        """Exactly n tokens of real text and the offsets where a sentence or paragraph ends (insertion points)."""
        ids: list[int] = []
        for chunk in self.paragraph_stream(rng, region):
            ids.extend(chunk)
            if len(ids) >= n:
                break
        ids = ids[:n]
        cuts = [0] + [i + 1 for i, t in enumerate(ids) if _ends_sentence(self.tok.decode([t]))]
        return ids, sorted(set(cuts + [n]))


def _ends_sentence(piece: str) -> bool:
    return piece.endswith((".", "\n", ".\n")) or piece.rstrip(" ").endswith(".")


def _nearest(cuts: list[int], target: float) -> int:
    return min(cuts, key=lambda c: (abs(c - target), c))


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randrange(10 ** (n - 1), 10 ** n))


def _rng(seed: int, task: str, context: int, index: int) -> random.Random:
    return random.Random(f"adaskip-quality:{seed}:{task}:{context}:{index}")  # str seeds are stable across runs


def check_task(task: str) -> None:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def _check(context: int, task: str) -> None:
    check_task(task)
    if context < MIN_CONTEXT:
        raise InputError(f"context must be at least {MIN_CONTEXT} tokens; got {context}")


def _haystack_sample(e: _Encoder, task: str, context: int, seed: int, index: int, intro: str,
                     needles: list[tuple[str, float]], queries: list[tuple[str, str, str, str]],
                     max_new_tokens: int) -> Sample:
    """Real text of the right length with each needle (text, depth) inserted at the sentence end nearest its depth.

    queries: (question, answer prefix, answer, key). The haystack is sized so that the longest query's prompt is
    exactly `context` tokens (the others are shorter by the length difference of their questions).
    """
    rng = _rng(seed, task, context, index)
    head = e.lead + e.enc(e.head + intro + "\n\n")
    suffixes = [(e.enc("\n\n" + q + e.tail + prefix), ans, key) for q, prefix, ans, key in queries]
    needle_ids = [(e.enc(" " + text + " "), depth) for text, depth in needles]
    longest = max(len(s) for s, _, _ in suffixes)
    n_fill = context - len(head) - longest - sum(len(ids) for ids, _ in needle_ids)
    if n_fill < 16:
        raise InputError(f"context {context} is too short for the {task} task")
    fill, cuts = e.filler(rng, n_fill)
    positions = [_nearest(cuts, depth * n_fill) for _, depth in needle_ids]
    body: list[int] = []
    placed, prev = [], 0
    for (ids, depth), pos in sorted(zip(needle_ids, positions), key=lambda x: x[1]):
        body += fill[prev:pos]
        placed.append({"offset": len(head) + len(body), "depth": depth, "length": len(ids)})
        body += ids
        prev = pos
    body += fill[prev:]
    prefix = head + body
    out = [Query(suffix=s, answer=ans, key=key) for s, ans, key in suffixes]
    return Sample(task=task, context=context, seed=seed, index=index, prefix=prefix, queries=out,
                  max_new_tokens=max_new_tokens, meta={"needles": placed, "haystack_tokens": n_fill})


def passkey(tokenizer: Any, context: int, seed: int = 0, index: int = 0, depth: float | None = None,
            chat: bool | None = None) -> Sample:
    """One 5-digit pass key hidden in real text at `depth` (0 = start, 1 = end; default: random from the seed),
    in Mohtashami & Jaggi's wording."""
    _check(context, "passkey")
    e, rng = _Encoder(tokenizer, chat), _rng(seed, "passkey/needle", context, index)
    key, drawn = _digits(rng, 5), rng.uniform(0.05, 0.95)
    depth = drawn if depth is None else depth
    if not 0.0 <= depth <= 1.0:
        raise InputError(f"needle depth must be between 0 and 1; got {depth}")
    intro = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
             "memorize it. I will ask you about it.")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _haystack_sample(e, "passkey", context, seed, index, intro, [(needle, depth)],
                            [("What is the pass key? Answer with the number only.", "The pass key is", key, "")],
                            max_new_tokens=ANSWER_TOKENS)


def multikey(tokenizer: Any, context: int, seed: int = 0, index: int = 0, keys: int = 4,
             chat: bool | None = None) -> Sample:
    """RULER's multi-key needle: `keys` needles with different keys and values; each key is asked once."""
    _check(context, "multikey")
    e, rng = _Encoder(tokenizer, chat), _rng(seed, "multikey/needle", context, index)
    names = rng.sample(WORDS, keys)
    values = [_digits(rng, 5) for _ in names]
    depths = [(i + rng.uniform(0.1, 0.9)) / keys for i in range(keys)]
    rng.shuffle(depths)
    intro = ("Some special magic numbers are hidden inside the following text. Make sure to memorize them. "
             "I will quiz you about the numbers afterwards.")
    needles = [(f"One of the special magic numbers for {k} is: {v}.", d) for k, v, d in zip(names, values, depths)]
    queries = [(f"What is the special magic number for {k} mentioned in the provided text? Answer with the number "
                f"only.", f"The special magic number for {k} mentioned in the provided text is", v, k)
               for k, v in zip(names, values)]
    return _haystack_sample(e, "multikey", context, seed, index, intro, needles, queries, max_new_tokens=ANSWER_TOKENS)


def kv(tokenizer: Any, context: int, seed: int = 0, index: int = 0, pairs: int = 4, asked: int = 3,
       chat: bool | None = None) -> Sample:
    """Key-value retrieval: a JSON object of `pairs` key-value pairs inside real text; `asked` of its keys are asked."""
    _check(context, "kv")
    e, rng = _Encoder(tokenizer, chat), _rng(seed, "kv/needle", context, index)
    names = [f"{a}-{b}" for a, b in zip(rng.sample(WORDS, pairs), rng.sample(WORDS, pairs))]
    values = [_digits(rng, 5) for _ in names]
    block = "{" + ", ".join(f'"{k}": "{v}"' for k, v in zip(names, values)) + "}"
    intro = ("A JSON object with key-value pairs is hidden inside the following text. Memorize it. I will ask you "
             "for the value of some keys.")
    needle = f"Here is the JSON object: {block}"
    picked = rng.sample(range(pairs), asked)
    queries = [(f'What is the value of key "{names[i]}" in the JSON object? Answer with the value only.',
                f'The value of key "{names[i]}" is', values[i], names[i]) for i in picked]
    return _haystack_sample(e, "kv", context, seed, index, intro, [(needle, rng.uniform(0.1, 0.9))], queries,
                            max_new_tokens=ANSWER_TOKENS)


def summary(tokenizer: Any, context: int, seed: int = 0, index: int = 0, lm_tokens: int = 32,
            max_new_tokens: int = 48, chat: bool | None = None) -> Sample:
    """A long real document to summarize (scored against the full model's summary), whose last `lm_tokens` real
    tokens double as the language-modelling target (perplexity, KL), teacher-forced after the prefix."""
    _check(context, "summary")
    e, rng = _Encoder(tokenizer, chat), _rng(seed, "summary", context, index)
    head = e.lead + e.enc(e.head + "Read the following text.\n\n")
    question = e.enc("\n\nSummarize the text above in three sentences." + e.tail)
    n_doc = context - len(head) - len(question)
    if n_doc < lm_tokens + 16:
        raise InputError(f"context {context} is too short for the summary task with {lm_tokens} LM tokens")
    doc, _ = e.filler(rng, n_doc)
    return Sample(task="summary", context=context, seed=seed, index=index, prefix=head + doc[:-lm_tokens],
                  queries=[Query(suffix=doc[-lm_tokens:] + question)], max_new_tokens=max_new_tokens,
                  target=doc[-lm_tokens:], meta={"document_tokens": n_doc})


GENERATORS = {"passkey": passkey, "multikey": multikey, "kv": kv, "summary": summary}


def make_samples(tokenizer: Any, task: str, context: int, count: int, seed: int = 0, **options: Any) -> list[Sample]:
    _check(context, task)
    return [GENERATORS[task](tokenizer, context, seed=seed, index=i, **options) for i in range(count)]


def heldout_windows(tokenizer: Any, count: int, tokens: int, seed: int = 0) -> list[list[int]]:
    """Plain real-text windows from the held-out region (the compensation study's evaluation text)."""
    e = _Encoder(tokenizer)
    bos = leading_special_tokens(tokenizer)
    return [bos + e.filler(_rng(seed, "heldout", tokens, i), tokens - len(bos), HELDOUT_REGION)[0]
            for i in range(count)]


# Seeds of the retrieval-aware selection's probes: offset from the evaluation's --seed (and from the task-calib
# ablation's offset 1_000_003), so no probe is an evaluated document.
PROBE_SEED_OFFSET = 2_000_003


def answer_probes(tokenizer: Any, context: int, count: int, seed: int, chat: bool | None = None,
                  phase: str = "all") -> list[Probe]:
    """`count` synthetic retrieval prompts of `context` tokens (passkey, multikey, kv in turn, one question each)
    from seed `seed + PROBE_SEED_OFFSET`, each with its answer appended: the positions that predict the answer's
    tokens are where a skip's effect on retrieval shows (adaskip.calibrate.compensation.kl_greedy_order).

    `phase` "decode": as a decode-mode plan answers, the prompt is the full model's prefix and only the answer tokens
    after the first are scored (the first comes from the unskipped prefill)."""
    probes = []
    for i in range(count):
        task = RETRIEVAL[i % len(RETRIEVAL)]
        s = GENERATORS[task](tokenizer, context, seed=seed + PROBE_SEED_OFFSET, index=i, chat=chat)
        q = s.queries[(i // len(RETRIEVAL)) % len(s.queries)]
        prompt = s.prefix + q.suffix
        answer = tokenizer.encode(" " + q.answer, add_special_tokens=False)
        first = len(prompt) if phase == "decode" else len(prompt) - 1
        probes.append(Probe(ids=prompt + answer[:-1], positions=list(range(first, len(prompt) + len(answer) - 1)),
                            prefix=len(prompt) if phase == "decode" else 0,
                            targets=answer[1:] if phase == "decode" else answer))
    return probes


PROMPT_FORMATS = ("auto", "chat", "plain")


def prompt_is_chat(prompt_format: str, model_source: str, tokenizer: Any) -> bool:
    """Whether task prompts use the chat template. `auto`: when the tokenizer has one, unless the model is a built-in
    base model whose template we attached only so that `--chat` works (base models answer plain prompts)."""
    if prompt_format != "auto":
        return prompt_format == "chat"
    builtin = BUILTIN_MODELS.get(model_source)
    if builtin is not None and not builtin.instruction_tuned:
        return False
    return bool(getattr(tokenizer, "chat_template", None))
