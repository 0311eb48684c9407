"""Every method x budget x mode through one engine: plans, the shared calibration, reference outputs, records.

Equal budget (the paper's): AdaSkip skips K sublayers, a baseline k = K/2 whole layers. An odd K has no
whole-layer equivalent, so baselines run only at even K (odd K rows are AdaSkip-only); Unified Skipping's rule
(idx % (L // k) == 1) can skip more than k layers, and every row says how many sublayers it really skipped.

Methods: `full` (nothing skipped: the ceiling and the reference), the baselines `early-exit`, `skipdecode`,
`unified`, and AdaSkip variants `adaskip[+MOD...]` with MODs: a stand-in rule (`token-ratio`, `channel-scale`,
`channel-affine`; default the paper's `norm-ratio`), `kl` (greedy KL selection instead of similarity), `ret` (the
retrieval-aware greedy selection: KL on plain text plus KL at the answer positions of synthetic retrieval prompts
from seeds the evaluation never uses), `attn` /
`ffn` (ranking restricted to one kind), `no-online` (no online decode step), `task-calib` (offline importance from
the task's own prompts instead of the built-in corpus). `adaskip-best` is the stand-in and selection rule that won
the held-out study.

Work sharing (exact, not approximations): a document's K/V is computed once per prefill mask and reused by its
queries and by the modes that share that mask (PrefixCache); a generation whose masks cannot change (no online
step within its length) is computed once per mask schedule; the full model's outputs are computed once.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adaskip import cost
from adaskip.model.tokenizer import eos_token_ids, load_tokenizer
from adaskip.calibrate.corpus import CalibrationOptions, CalibrationSet, load_calibration
from adaskip.errors import InputError, PlanError, check_choice
from adaskip.model import LoadedModel, load_model
from adaskip.plan import (DEFAULT_WINDOW, MODES, Calibration, SkipPlan, adaskip_plan, baseline_plan, check_mode,
                          rank_by_similarity)
from adaskip.policy import SkipPolicy
from adaskip.calibrate import compensation as comp
from adaskip.calibrate import selection
from adaskip.calibrate import tasks
from adaskip.calibrate.tasks import PROMPT_FORMATS, prompt_is_chat
from adaskip.eval import metrics
from adaskip.runtime.engine import StepOutput
from adaskip.runtime.generate import Generator, SamplingParams
from adaskip.runtime.loader import load_runtime
from adaskip.runtime.stepper import Stepper
from adaskip.runtime.torch_engine import KVCache, TorchEngine

BASELINES = ("early-exit", "skipdecode", "unified")
RULE_ALIASES = {"norm-ratio": "norm-ratio", "token-ratio": "token-ratio", "channel-scale": "channel-scale",
                "channel-affine": "channel-affine"}
MODIFIERS = ("kl", "ret", "retN", "served", "em", "attn", "ffn", "no-online", "task-calib")


# -- methods -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    name: str
    base: str  # "full", "adaskip" or a baseline
    rule: str = "norm-ratio"  # stand-in for skipped sublayers (adaskip)
    selection: str = "similarity"  # or "kl", or "kl-ret" (KL plus KL at retrieval answers)
    kind: str = "all"  # "attn" / "ffn": ranking restricted to one kind
    online: bool = True
    calibration: str = "builtin"  # or "task"
    probe_tokens: int | None = None  # kl-ret: the retrieval probes' length (None: --kl-tokens, like the KL windows)
    served: bool = False  # kl / kl-ret: score skips where the plan's mode applies them (decode mode: after the prefill)
    answers_first: bool = False  # kl-ret: rank by the probes' exact-match answers first, then by KL

    def selection_phase(self, mode: str) -> str:
        """Where the KL selection scores a skip for a plan of `mode` (compensation.PHASES): a decode-mode plan's
        skips never touch the prompt, so `served` scores them on decode steps after a full-model prefill."""
        return comp.phase_of(mode) if self.served else "all"

    @property
    def is_reference(self) -> bool:
        return self.base == "adaskip" and self.rule == "norm-ratio" and self.selection == "similarity" and \
            self.kind == "all" and self.online and self.calibration == "builtin"


def parse_method(name: str, best: tuple[str, str] | None = None) -> Method:
    """`adaskip+channel-affine+kl`, `early-exit`, `adaskip-best`, ... -> Method (clear error for anything else)."""
    name = name.strip()
    if name in ("full",) + BASELINES:
        return Method(name, name)
    if name == "adaskip-best":
        if best is None:
            raise InputError("adaskip-best needs the compensation study (it picks the winner)")
        return Method(name, "adaskip", rule=best[0], selection=best[1])
    parts = name.split("+")
    if parts[0] != "adaskip":
        raise InputError(f"unknown method {name!r}: use full, {', '.join(BASELINES)}, adaskip, adaskip-best or "
                         f"adaskip+MOD[+MOD...] with MOD in {', '.join(list(RULE_ALIASES) + list(MODIFIERS))}")
    kw: dict[str, Any] = {}
    for mod in parts[1:]:
        if mod in RULE_ALIASES:
            kw["rule"] = RULE_ALIASES[mod]
        elif mod == "kl":
            kw.setdefault("selection", "kl")
        elif mod == "ret" or (mod.startswith("ret") and mod[3:].isdigit()):
            # retN: probes of N tokens, so the objective sees the answer positions at the served length (attention
            # sublayers that long-range retrieval needs may not matter at --kl-tokens)
            kw["selection"] = "kl-ret"
            if mod != "ret":
                kw["probe_tokens"] = int(mod[3:])
                if kw["probe_tokens"] < tasks.MIN_CONTEXT:
                    raise InputError(f"{name}: {mod} asks for {kw['probe_tokens']}-token probes; retrieval prompts "
                                     f"need at least {tasks.MIN_CONTEXT} tokens")
        elif mod == "served":
            kw["served"] = True
        elif mod == "em":
            kw["answers_first"] = True
        elif mod in ("attn", "ffn"):
            kw["kind"] = mod
        elif mod == "no-online":
            kw["online"] = False
        elif mod == "task-calib":
            kw["calibration"] = "task"
        else:
            raise InputError(f"unknown modifier {mod!r} in method {name!r}; modifiers: "
                             f"{', '.join(list(RULE_ALIASES) + list(MODIFIERS))}")
    if kw.get("selection") in ("kl", "kl-ret") and "kind" in kw:
        raise InputError(f"{name}: kl selection already ranks attention and FFN together; drop attn/ffn")
    if kw.get("served") and kw.get("selection") not in ("kl", "kl-ret"):
        raise InputError(f"{name}: served changes where the KL selection scores a skip; add kl or ret")
    if kw.get("answers_first") and kw.get("selection") != "kl-ret":
        raise InputError(f"{name}: em ranks by the retrieval probes' answers; add ret or retN")
    return Method(name, "adaskip", **kw)


# -- options -------------------------------------------------------------------------------------------------------

RET_PROBES = 6

@dataclass
class EvalOptions:
    model: str
    out: str
    methods: list[str] = field(default_factory=lambda: ["adaskip", "adaskip-best", *BASELINES])
    budgets: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 8])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    contexts: list[int] = field(default_factory=lambda: [1024, 2048])
    tasks: list[str] = field(default_factory=lambda: list(tasks.TASKS))
    samples: int = 2  # documents per task (summary; retrieval too unless `questions` is set)
    questions: int | None = None  # at least this many retrieval questions per cell (documents split over the tasks)
    seed: int = 0
    engine: str | None = None  # an engine directory evaluated as one more row
    calib_prompts: int = 16
    calib_tokens: int = 1024
    window: int = DEFAULT_WINDOW
    summary_tokens: int = 48
    lm_tokens: int = 32
    study_windows: int = 2
    study_tokens: int = 1024
    kl_windows: int = 1
    kl_tokens: int = 512
    kl_candidates: int = 16
    ret_probes: int = RET_PROBES  # `ret` selection: synthetic retrieval prompts (held-out seeds)
    prompt_format: str = "auto"  # auto | chat | plain (see prompt_is_chat)
    progress: bool = True

    def validate(self) -> None:
        for m in self.modes:
            check_mode(m, "--modes")
        for t in self.tasks:
            tasks.check_task(t)
        if any(k < 0 for k in self.budgets) or not self.budgets:
            raise InputError("--budgets must be non-negative integers (sublayers)")
        if any(c < tasks.MIN_CONTEXT for c in self.contexts) or not self.contexts:
            raise InputError(f"--contexts must be at least {tasks.MIN_CONTEXT} tokens")
        if self.samples < 1:
            raise InputError("--samples must be at least 1")
        if self.questions is not None and self.questions < 1:
            raise InputError("--questions must be at least 1")
        if self.questions is not None and not any(t in tasks.RETRIEVAL for t in self.tasks):
            raise InputError(f"--questions counts retrieval questions; --tasks has none of {', '.join(tasks.RETRIEVAL)}")
        check_choice(self.prompt_format, PROMPT_FORMATS, "--prompt-format")
        CalibrationOptions(prompts=self.calib_prompts, tokens=self.calib_tokens).validate()
        for name in self.methods:
            parse_method(name, best=("norm-ratio", "similarity"))
        for label, v in (("--summary-tokens", self.summary_tokens), ("--lm-tokens", self.lm_tokens),
                         ("--window", self.window), ("--ret-probes", self.ret_probes),
                         ("--study-windows", self.study_windows), ("--kl-windows", self.kl_windows)):
            if v < 1:
                raise InputError(f"{label} must be at least 1")

    def digest(self, fingerprint: str) -> str:
        """What the records depend on beyond their own key (changing any of it starts a new results file)."""
        keep = {k: getattr(self, k) for k in ("seed", "calib_prompts", "calib_tokens", "window", "summary_tokens",
                                               "lm_tokens", "study_windows", "study_tokens", "kl_windows",
                                               "kl_tokens", "kl_candidates")}
        keep["model"], keep["format"] = fingerprint, 1
        if self.ret_probes != RET_PROBES:  # only when set (records of earlier runs keep their file): the `ret` rows'
            keep["ret_probes"] = self.ret_probes  # plans depend on it but their record keys do not name it
        if self.prompt_format != "auto":  # only when set, so records of earlier runs keep their file
            keep["prompt_format"] = self.prompt_format
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


# -- exact work sharing --------------------------------------------------------------------------------------------

class PrefixCache:
    """An Engine wrapper that computes a registered document prefix once per prefill mask and copies its K/V into
    each request's cache, then prefills only the request's own suffix (chunked prefill: same math as one pass)."""

    def __init__(self, engine: TorchEngine, capacity: int = 16):
        self.engine = engine
        self.spec, self.dtype = engine.spec, engine.dtype
        self.prefixes: dict[tuple[int, int], tuple[int, ...]] = {}
        self.full: dict[tuple, tuple[list, list, StepOutput]] = {}  # nothing skipped: shared by every plan
        self.memo: OrderedDict[tuple, tuple[list, list, StepOutput]] = OrderedDict()  # LRU of skipping plans
        self.capacity = capacity
        self.comp_key = ""
        self.hits = 0

    def bind(self, engine: TorchEngine, comp_key: str) -> None:
        """Run another plan's engine (same weights); `comp_key` names its per-channel stand-ins, which enter the
        reuse key together with the skip set and the scales."""
        self.engine, self.comp_key = engine, comp_key

    def register(self, prefix: list[int]) -> None:
        p = tuple(prefix)
        self.prefixes[(len(p), hash(p))] = p

    def new_cache(self, batch: int, capacity: int, cached_layers: list[int]) -> KVCache:
        return self.engine.new_cache(batch, capacity, cached_layers)

    def decode(self, *args: Any, **kwargs: Any) -> StepOutput:
        return self.engine.decode(*args, **kwargs)

    def _match(self, seq: tuple[int, ...]) -> tuple[int, ...] | None:
        for (n, h), p in self.prefixes.items():
            if n <= len(seq) and hash(seq[:n]) == h and seq[:n] == p:
                return p
        return None

    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, cache: KVCache, skip: torch.Tensor,
                scales: torch.Tensor, all_logits: bool = False, want_stats: bool = True) -> StepOutput:
        seq = tuple(ids[0].tolist()) if ids.shape[0] == 1 else ()
        prefix = self._match(seq) if seq and cache.length == 0 and not all_logits and bool(valid.all()) else None
        if prefix is None:
            return self.engine.prefill(ids, valid, cache, skip, scales, all_logits, want_stats)
        skipped = tuple(torch.nonzero(skip[0]).flatten().tolist())
        runs = [i for i in range(self.spec.num_layers) if 2 * i not in skipped]
        key = (prefix, skipped, tuple(scales[0].tolist()), self.comp_key) if skipped else (prefix,)
        store = self.memo if skipped else self.full
        if key not in store:
            x = torch.tensor([prefix])
            own = self.engine.new_cache(1, len(prefix), runs)
            out = self.engine.prefill(x, torch.ones_like(x, dtype=torch.bool), own, skip, scales, want_stats=False)
            store[key] = (own.k, own.v, out)
            while len(self.memo) > self.capacity:
                self.memo.popitem(last=False)
        else:
            self.hits += 1
            if skipped:
                self.memo.move_to_end(key)
        k, v, out = store[key]
        n = len(prefix)
        work = self.engine.new_cache(1, len(seq), runs)
        for i in runs:
            work.k[i][:, :, :n], work.v[i][:, :, :n] = k[i], v[i]
        work.valid[:, :n], work.length, work.next_pos[:] = True, n, n
        if len(seq) > n:
            rest = torch.tensor([seq[n:]])
            out = self.engine.prefill(rest, torch.ones_like(rest, dtype=torch.bool), work, skip, scales,
                                      want_stats=want_stats)
        for i in cache.cached_layers:  # hand the K/V over to the caller's cache (its layers run in this prefill)
            if work.k[i] is None:
                raise RuntimeError(f"layer {i} is cached but its attention was skipped in prefill")
            cache.k[i][:, :, :len(seq)], cache.v[i][:, :, :len(seq)] = work.k[i], work.v[i]
        cache.valid[:, :len(seq)], cache.length, cache.next_pos[:] = True, len(seq), len(seq)
        return out


def mask_schedule(policy: SkipPolicy, decode_steps: int) -> tuple | None:
    """Every mask a request of `decode_steps` decode steps sees, when they cannot depend on the request's own
    online statistics (None otherwise): two requests with the same schedule and prompt give the same tokens."""
    if policy.learns_online and decode_steps > policy.plan.window:
        return None
    state = policy.new_request()
    masks = [policy.prefill_mask(state)]
    for step in range(decode_steps):
        state.decode_steps = step
        masks.append(policy.decode_mask(state))
    return tuple((m.skip, m.scales) for m in masks)


# -- the evaluator -------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One evaluated configuration: a method at a budget in a mode (the plan, its engine and policy)."""

    method: Method
    k: int  # budget in sublayers
    mode: str
    plan: SkipPlan
    engine: Any
    policy: SkipPolicy
    label: str = ""

    @property
    def comp_key(self) -> str:
        c = self.plan.compensation
        return hashlib.sha1(json.dumps(c.to_dict()).encode()).hexdigest() if c else ""

    @property
    def key(self) -> str:
        return f"{self.label or self.method.name}|K={self.k}|{self.mode}"


class Evaluator:
    def __init__(self, opts: EvalOptions, model: LoadedModel | None = None, tokenizer: Any = None):
        opts.validate()
        self.opts = opts
        self.out = Path(opts.out)
        self.model = model or load_model(opts.model)
        self.tok = tokenizer or load_tokenizer(self.model)
        self.chat = prompt_is_chat(opts.prompt_format, opts.model, self.tok)
        self.spec = self.model.spec
        self.eos = tuple(eos_token_ids(self.model, self.tok)) if self.model.tokenizer_dir else ()
        self.base_engine = TorchEngine.from_loaded(self.model)
        self.threads = torch.get_num_threads()  # stated with the compute in the report
        self.digest = opts.digest(self.model.fingerprint)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out / f"results-{self.digest}.jsonl"
        self.records = self._load_records()
        self._calib: dict[str, tuple[Calibration, comp.ChannelStats]] = {}
        self._orders: dict[str, list[int]] = {}
        self.study: dict[str, Any] | None = None
        self.cache = PrefixCache(self.base_engine)
        self._gen_memo: dict[tuple, str] = {}

    def log(self, msg: str) -> None:
        if self.opts.progress:
            tqdm.write(f"adaskip-eval: {msg}", file=sys.stderr)

    # -- persistence (resumable: every finished unit is one JSON line) ------------------------------------------
    def _load_records(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        if self.results_path.is_file():
            for line in self.results_path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupted run: recomputed
                    continue
                records[r["id"]] = r
        return records

    def _save(self, records: list[dict[str, Any]]) -> None:
        with open(self.results_path, "a") as f:
            for r in records:
                self.records[r["id"]] = r
                f.write(json.dumps(r) + "\n")

    def _cached_json(self, name: str, compute) -> Any:
        path = self.out / f"{name}-{self.digest}.json"
        if path.is_file():
            return json.loads(path.read_text())
        value = compute()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1))
        tmp.replace(path)
        return value

    # -- calibration (one per source, cached in the out dir) -----------------------------------------------------
    def calibration(self, source: str) -> tuple[Calibration, comp.ChannelStats]:
        if source in self._calib:
            return self._calib[source]
        path = self.out / f"calibration-{source}-{self.digest}.pt"
        if path.is_file():
            d = torch.load(path, weights_only=True)
            c = (Calibration(**json.loads(d["calibration"])), comp.ChannelStats.from_dict(d["stats"]))
        else:
            data = self._calibration_data(source)
            self.log(f"calibrating on {len(data.prompts)} prompts x {self.opts.calib_tokens} tokens ({data.source})")
            c = comp.collect(self.base_engine, data, progress=self.opts.progress)
            tmp = path.with_suffix(".tmp")
            torch.save({"calibration": json.dumps(asdict(c[0])), "stats": c[1].to_dict()}, tmp)
            tmp.replace(path)
        self._calib[source] = c
        return c

    def _calibration_data(self, source: str) -> CalibrationSet:
        o = self.opts
        if source == "builtin":
            return load_calibration(self.tok, o.calib_prompts, o.calib_tokens)
        # the task's own prompts, from seeds the evaluation never uses (the paper's same-task importance)
        prompts: list[list[int]] = []
        kinds = [t for t in o.tasks] or list(tasks.TASKS)
        i = 0
        while len(prompts) < o.calib_prompts:
            t = kinds[i % len(kinds)]
            try:
                s = tasks.GENERATORS[t](self.tok, o.calib_tokens, seed=o.seed + 1_000_003, index=i,
                                        chat=self.chat)
            except InputError as e:
                raise InputError(f"task calibration at --calib-tokens {o.calib_tokens}: {e}") from None
            prompts.append((s.prefix + s.queries[0].suffix)[:o.calib_tokens])
            i += 1
        h = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
        return CalibrationSet(prompts=prompts, source="task:" + ",".join(kinds), digest="sha256:" + h)

    # -- compensation study on held-out text, and the greedy KL order --------------------------------------------
    def run_study(self) -> dict[str, Any]:
        """Held-out next-token KL of every stand-in rule (similarity ranking) and of the KL-greedy ranking with the
        best rule, at every budget; picks adaskip-best."""
        if self.study is not None:
            return self.study
        calib, stats = self.calibration("builtin")
        o = self.opts
        budgets = sorted({k for k in o.budgets if k > 0})

        def compute() -> dict[str, Any]:
            windows = tasks.heldout_windows(self.tok, o.study_windows, o.study_tokens, seed=o.seed)
            self.log(f"compensation study: {len(comp.RULES)} rules x {len(budgets)} budgets on "
                     f"{len(windows)} held-out windows of {o.study_tokens} tokens")
            ref = comp.reference_logits(self.base_engine, windows)
            ranking = rank_by_similarity(calib.similarity)
            table: dict[str, dict[str, float]] = {}
            bar = tqdm(total=len(comp.RULES) * len(budgets) + len(budgets), desc="study", unit="plan",
                       disable=not o.progress, file=sys.stderr)
            for rule in comp.RULES:
                scales, c = comp.fit(rule, stats, calib)
                table[f"{rule}/similarity"] = {}
                for k in budgets:
                    table[f"{rule}/similarity"][str(k)] = comp.mean_kl(
                        self.model.weights, self.spec, windows, ref, ranking[:k], scales, c)
                    bar.update(1)
            bar.close()
            best_rule = min(comp.RULES, key=lambda r: _mean(table[f"{r}/similarity"].values()))
            order = self.kl_order(best_rule)
            scales, c = comp.fit(best_rule, stats, calib)
            table[f"{best_rule}/kl"] = {str(k): comp.mean_kl(self.model.weights, self.spec, windows, ref, order[:k],
                                                             scales, c) for k in budgets}
            sel = "kl" if _mean(table[f"{best_rule}/kl"].values()) < _mean(
                table[f"{best_rule}/similarity"].values()) else "similarity"
            return {"kl": table, "best": [best_rule, sel], "windows": len(windows), "tokens": o.study_tokens,
                    "budgets": budgets}

        self.study = self._cached_json("study", compute)
        return self.study

    def kl_order(self, rule: str, source: str = "builtin", retrieval: bool = False,
                 probe_tokens: int | None = None, phase: str = "all", answers_first: bool = False) -> list[int]:
        """The greedy KL ranking (`retrieval`: the retrieval-aware one, which also scores the KL at the answers of
        synthetic retrieval prompts from held-out seeds, of `probe_tokens` tokens or --kl-tokens; `phase`: where a
        skip is scored, compensation.PHASES; `answers_first`: the probes' exact-match answers rank before the KL),
        cached in the out dir."""
        tag = f"{rule}-ret{self.opts.ret_probes}" if retrieval else rule
        if retrieval and probe_tokens is not None:
            tag += f"x{probe_tokens}"
        if phase != "all":
            tag += f"-{phase}"
        if answers_first:
            tag += "-em"
        key = f"{tag}/{source}"
        if key in self._orders:
            return self._orders[key]
        calib, stats = self.calibration(source)
        o = self.opts
        k_max = min(max(o.budgets), self.spec.num_sublayers)

        def compute() -> list[int]:
            data = self._calibration_data(source)
            scales, c = comp.fit(rule, stats, calib)
            recipe = selection.GreedyRecipe(candidates=o.kl_candidates, windows=o.kl_windows, window_tokens=o.kl_tokens,
                                            probes=o.ret_probes if retrieval else 0,
                                            probe_tokens=probe_tokens or o.kl_tokens, answers_first=answers_first,
                                            seed=o.seed)
            self.log(f"greedy KL selection ({rule}{', retrieval-aware' if retrieval else ''}"
                     f"{', decode phase' if phase == 'decode' else ''}{', answers first' if answers_first else ''}) "
                     f"over {max(o.kl_candidates, k_max)} candidates, K up to {k_max}")
            return selection.greedy_order(TorchEngine(self.spec, self.model.weights), self.tok, data.prompts,
                                          calib.similarity, scales, c, k_max, recipe, phase, self.chat,
                                          progress=o.progress)

        # greedy choices do not depend on how far the greedy goes: a longer cached order (same candidates) serves
        for path in self.out.glob(f"kl-order-{tag}-{source}-K*-{self.digest}.json"):
            longer = json.loads(path.read_text())
            if len(longer) >= k_max and max(o.kl_candidates, len(longer)) == max(o.kl_candidates, k_max):
                self._orders[key] = longer
                return longer
        self._orders[key] = self._cached_json(f"kl-order-{tag}-{source}-K{k_max}", compute)
        return self._orders[key]

    # -- plans ---------------------------------------------------------------------------------------------------
    def plan_for(self, method: Method, k: int, mode: str) -> SkipPlan | None:
        """The method's plan at budget K sublayers, or None when it has no equal-budget plan (odd K baselines)."""
        L, fp, name = self.spec.num_layers, self.model.fingerprint, self.spec.name
        if method.base == "full":
            return baseline_plan("early-exit", L, 0, mode, fp, name)
        if method.base in BASELINES:
            if k % 2:
                return None
            try:
                return baseline_plan(method.base, L, k // 2, mode, fp, name)
            except PlanError:
                return None
        calib, stats = self.calibration(method.calibration)
        scales, c = comp.fit(method.rule, stats, calib)
        if method.selection in ("kl", "kl-ret"):
            order = self.kl_order(method.rule, method.calibration, retrieval=method.selection == "kl-ret",
                                  probe_tokens=method.probe_tokens, phase=method.selection_phase(mode),
                                  answers_first=method.answers_first)
        elif method.kind != "all":
            parity = 0 if method.kind == "attn" else 1
            order = [j for j in rank_by_similarity(calib.similarity) if j % 2 == parity]
        else:
            order = None
        if order is not None and k > len(order):
            return None
        return adaskip_plan(calib, k, mode, fp, name, window=self.opts.window, online=method.online,
                            order=order, scales=scales, compensation=c,
                            selection={"rule": method.selection, "kind": method.kind, "k": k,
                                       "compensation": method.rule, "calibration": method.calibration,
                                       "phase": method.selection_phase(mode), "answers_first": method.answers_first})

    def rows(self) -> list[Row]:
        o = self.opts
        best = None
        if any(m == "adaskip-best" for m in o.methods):
            best = tuple(self.run_study()["best"])
        out: list[Row] = []
        for name in o.methods:
            m = parse_method(name, best)
            budgets = [0] if m.base == "full" else o.budgets
            for k in budgets:
                for mode in o.modes:
                    plan = self.plan_for(m, k, mode)
                    if plan is None:
                        continue
                    engine = TorchEngine(self.spec, self.model.weights, plan.compensation)
                    out.append(Row(m, k, mode, plan, engine, SkipPolicy(plan)))
                    if m.base == "adaskip":  # reusable: adaskip-build --plan out/plans/<name>.json
                        self._save_plan(plan, f"{m.name}-K{k}-{mode}")
        return out

    def _save_plan(self, plan: SkipPlan, name: str) -> None:
        folder = self.out / "plans"
        folder.mkdir(exist_ok=True)
        tmp = folder / f".{name}.json.tmp"
        plan.save(tmp)
        tmp.replace(folder / f"{name}.json")

    def engine_row(self) -> Row | None:
        if not self.opts.engine:
            return None
        rt = load_runtime(self.opts.engine)
        if rt.engine_dir.fingerprint != self.model.fingerprint:
            raise InputError(f"engine {self.opts.engine} was built from another model than --model {self.opts.model}")
        plan = rt.policy.plan
        k = plan.k if plan.budget_unit == "sublayers" else 2 * plan.k
        return Row(Method(f"engine:{Path(self.opts.engine).name}", plan.method), k, plan.mode, plan, rt.engine,
                   rt.policy, label=f"engine:{Path(self.opts.engine).name}")

    # -- samples -------------------------------------------------------------------------------------------------
    def documents(self, task: str) -> int:
        """Documents of `task` per context: --samples, or for retrieval with --questions enough documents (the same
        number for each retrieval task) that the cell holds at least that many questions."""
        o = self.opts
        if task not in tasks.RETRIEVAL or o.questions is None:
            return o.samples
        per_round = sum(tasks.QUESTIONS_PER_DOCUMENT[t] for t in o.tasks if t in tasks.RETRIEVAL)
        return max(o.samples, math.ceil(o.questions / per_round))

    def samples(self, context: int) -> list[tasks.Sample]:
        """Every document at `context`, index-major (passkey 0, multikey 0, ..., passkey 1, ...): an interrupted run
        has evaluated every method on the same leading documents (a paired design at every point)."""
        o = self.opts
        per_task = {}
        for t in o.tasks:
            kw = {"lm_tokens": o.lm_tokens, "max_new_tokens": o.summary_tokens} if t == "summary" else {}
            per_task[t] = tasks.make_samples(self.tok, t, context, self.documents(t), seed=o.seed, chat=self.chat,
                                             **kw)
        depth = max(len(v) for v in per_task.values())
        return [per_task[t][i] for i in range(depth) for t in o.tasks if i < len(per_task[t])]

    # -- evaluation ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, dict[str, Any]]:
        o = self.opts
        full = Row(parse_method("full"), 0, "prefill", self.plan_for(parse_method("full"), 0, "prefill"),
                   self.base_engine, SkipPolicy(self.plan_for(parse_method("full"), 0, "prefill")))
        rows = self.rows()
        extra = self.engine_row()
        if extra is not None:
            rows.append(extra)
        for context in o.contexts:
            if context + max(o.summary_tokens, 8) > self.spec.max_position_embeddings:
                raise InputError(f"context {context} + generated tokens exceeds the model's "
                                 f"{self.spec.max_position_embeddings} positions")
        per_context = {c: self.samples(c) for c in o.contexts}
        total = sum(len(v) for v in per_context.values()) * (len(rows) + 1)
        self.log(f"{len(rows)} configurations x {len(o.contexts)} contexts x "
                 f"{', '.join(f'{c}: {len(v)}' for c, v in per_context.items())} documents -> "
                 f"{self.results_path.name}")
        bar = tqdm(total=total, desc="evaluate", unit="doc", disable=not o.progress, file=sys.stderr)
        try:
            for context, samples in per_context.items():
                for s in samples:  # document-major: one document's K/V serves every row, then it is dropped
                    self.cache = PrefixCache(self.base_engine, capacity=len(rows) + 2)
                    self.cache.register(s.prefix)
                    self._gen_memo = {}
                    ref = self._reference(full, s)
                    bar.update(1)
                    for row in rows:
                        bar.set_postfix_str(f"{s.name}: {row.key}")
                        self._evaluate(row, s, ref)
                        bar.update(1)
        finally:
            bar.close()
        return self.records

    def _reference_path(self, s: tasks.Sample) -> Path:
        return self.out / f"reference-{self.digest}" / f"{s.name}.pt"

    def _reference(self, full: Row, s: tasks.Sample) -> dict[str, Any]:
        """The full model's outputs on one document: retrieval ceiling, summary (the ROUGE-L reference) and target
        logits; one file per document, so an interrupted run keeps what it computed (files of the older one-file
        layout, reference-<context>-<digest>.pt, are still read)."""
        path = self._reference_path(s)
        if path.is_file():
            ref = torch.load(path, weights_only=True)
        else:
            legacy = self.out / f"reference-{s.context}-{self.digest}.pt"
            old = torch.load(legacy, weights_only=True) if legacy.is_file() else {}
            if s.name in old:
                ref = old[s.name]
            else:
                t0 = time.perf_counter()
                ref = self._run_sample(full, s, None)
                ref["seconds"] = time.perf_counter() - t0
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(ref, tmp)
            tmp.replace(path)
        self._save_records(full, s, ref, ref, ref.get("seconds"))
        return ref

    def _evaluate(self, row: Row, s: tasks.Sample, ref: dict[str, Any]) -> None:
        if self._record_id(row, s, "done") in self.records:
            return
        if isinstance(row.engine, TorchEngine):
            self.cache.bind(row.engine, row.comp_key)
        t0 = time.perf_counter()
        out = self._run_sample(row, s, ref)
        self._save_records(row, s, out, ref, time.perf_counter() - t0)

    def _generator(self, row: Row) -> Generator:
        engine = self.cache if isinstance(row.engine, TorchEngine) else row.engine
        return Generator(engine, row.policy, self.tok, self.eos)

    def _run_sample(self, row: Row, s: tasks.Sample, ref: dict[str, Any] | None) -> dict[str, Any]:
        gen = self._generator(row)
        texts = [self._generate(gen, row, s.prefix + q.suffix, s.max_new_tokens) for q in s.queries]
        out: dict[str, Any] = {"texts": texts}
        if s.target:
            out["target_logits"] = self._teacher_forced(row, s.prefix, s.target)
        return out

    def _generate(self, gen: Generator, row: Row, ids: list[int], n: int) -> str:
        schedule = mask_schedule(row.policy, n - 1)
        key = (tuple(ids), n, schedule, row.comp_key, id(row.engine) if not isinstance(row.engine, TorchEngine)
               else 0) if schedule is not None else None
        if key is not None and key in self._gen_memo:
            return self._gen_memo[key]
        text = gen.generate([ids], SamplingParams(max_new_tokens=n))[0].text
        if key is not None:
            self._gen_memo[key] = text
        return text

    def _teacher_forced(self, row: Row, prefix: list[int], target: list[int]) -> torch.Tensor:
        """Next-token logits for each target token: the prefix's prefill, then the target fed one decode step at a
        time through the step loop (in one chunk when the masks of those steps cannot change)."""
        stepper = Stepper(self.cache if isinstance(row.engine, TorchEngine) else row.engine, row.policy)
        [request] = stepper.new_rows(1)
        cache = stepper.new_cache(1, len(prefix) + len(target))
        x = torch.tensor([prefix])
        first = stepper.prefill([request], x, torch.ones_like(x, dtype=torch.bool), cache)
        if isinstance(row.engine, TorchEngine):  # the chunk runs on the plan's own engine, past the prefix cache
            stepper = Stepper(row.engine, row.policy)
        return torch.cat([first.logits, stepper.teacher_force(request, target[:-1], cache)])

    # -- records -------------------------------------------------------------------------------------------------
    def _record_id(self, row: Row, s: tasks.Sample, what: str) -> str:
        return f"{row.key}|{s.name}|{what}"

    def _save_records(self, row: Row, s: tasks.Sample, out: dict[str, Any], ref: dict[str, Any],
                      seconds: float | None = None) -> None:
        if self._record_id(row, s, "done") in self.records:
            return
        base = {"method": row.label or row.method.name, "k": row.k, "mode": row.mode, "context": s.context,
                "sample": s.name, "skipped": len(row.plan.skip)}

        def ideal(new_tokens: int) -> dict[str, Any]:
            """The offline sets' ideal (FLOP) speedups over a generation of `new_tokens`: its prefill and the decode
            steps after the prefill's token (SkipDecode's set grows with the step)."""
            return cost.speedups(self.spec, row.policy.layout, s.context, max(new_tokens - 1, 1))

        recs = []
        if s.task in tasks.RETRIEVAL:
            for n, (q, text) in enumerate(zip(s.queries, out["texts"])):
                recs.append({**base, "id": self._record_id(row, s, f"q{n}"), "task": s.task, "answer": q.answer,
                             "text": text, "score": metrics.exact_match(text, q.answer),
                             "speedup": ideal(s.max_new_tokens)})
        else:
            recs.append({**base, "id": self._record_id(row, s, "summary"), "task": "summary", "text": out["texts"][0],
                         "score": metrics.rouge_l(out["texts"][0], ref["texts"][0]),
                         "speedup": ideal(s.max_new_tokens)})
            target = torch.tensor(s.target)
            nll = metrics.token_nll(out["target_logits"], target)
            kl = comp.kl_divergence(ref["target_logits"], out["target_logits"])
            recs.append({**base, "id": self._record_id(row, s, "lm"), "task": "lm", "nll": nll.tolist(),
                         "kl": kl.tolist(), "speedup": ideal(len(s.target))})
        # seconds: this document's compute for this row (shared work is counted where it was done); None: unknown
        recs.append({**base, "id": self._record_id(row, s, "done"), "task": "done", "seconds": seconds})
        self._save(recs)


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def run_eval(opts: EvalOptions) -> Evaluator:
    ev = Evaluator(opts)
    ev.run()
    return ev
