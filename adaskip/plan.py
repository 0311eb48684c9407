"""SkipPlan: the artifact every stage passes on (calibration stats, skip set, scales, mode, online policy, method).

Versioned JSON, validated against a JSON schema on load; `check_model` refuses a plan built for another model.
Sublayer j: j = 2i is the attention of layer i, j = 2i + 1 its FFN.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from adaskip import __version__
from adaskip.errors import AdaskipError, InputError, PlanError, check_choice

PLAN_FORMAT = "adaskip.skip-plan"
PLAN_VERSION = 1
# Version 2 = version 1 plus a per-channel `compensation`. A plan without one is still written as version 1, so
# older readers keep reading it and refuse (instead of silently ignoring) a plan whose skipped sublayers need it.
PLAN_VERSIONS = (1, 2)
COMPENSATION_RULES = ("norm-ratio", "token-ratio", "channel-scale", "channel-affine")
METHODS = ("adaskip", "early-exit", "skipdecode", "unified")
MODES = ("prefill", "decode", "e2e")
DEFAULT_WINDOW = 20


def check_method(method: str, what: str = "--method", error: type[AdaskipError] = InputError) -> None:
    """A skipping method adaskip knows (options and plan files alike)."""
    check_choice(method, METHODS, what, error)


def check_mode(mode: str, what: str = "--mode", error: type[AdaskipError] = InputError) -> None:
    """A phase selection adaskip knows (options and plan files alike)."""
    check_choice(mode, MODES, what, error)

_STATS = {"type": "array", "items": {"type": "number"}}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format", "version", "method", "mode", "num_layers", "budget", "skip", "scales", "online", "model",
                 "tool"],
    "properties": {
        "format": {"const": PLAN_FORMAT},
        "version": {"enum": list(PLAN_VERSIONS)},
        "method": {"enum": list(METHODS)},
        "mode": {"enum": list(MODES)},
        "num_layers": {"type": "integer", "minimum": 1},
        "budget": {"type": "object", "required": ["unit", "k"], "properties": {
            "unit": {"enum": ["sublayers", "layers"]}, "k": {"type": "integer", "minimum": 0}}},
        "skip": {"type": "array", "items": {"type": "integer", "minimum": 0}, "uniqueItems": True},
        "scales": {"type": "array", "items": {"type": "number"}},
        "online": {"type": "object", "required": ["enabled", "window", "beta"], "properties": {
            "enabled": {"type": "boolean"}, "window": {"type": "integer", "minimum": 1},
            "beta": {"type": ["number", "null"]}}},
        "calibration": {"type": ["object", "null"], "additionalProperties": False,
                        "required": ["similarity", "norm_ratio", "num_prompts", "prompt_tokens", "data_digest",
                                     "source"],
                        "properties": {
            "similarity": _STATS, "norm_ratio": _STATS, "num_prompts": {"type": "integer", "minimum": 1},
            "prompt_tokens": {"type": "integer", "minimum": 1}, "data_digest": {"type": "string"},
            "source": {"type": "string"}}},
        "selection": {"type": "object"},
        "compensation": {"type": ["object", "null"], "additionalProperties": False, "required": ["rule", "sublayers"],
                         "properties": {
            "rule": {"enum": list(COMPENSATION_RULES)},
            "sublayers": {"type": "object", "patternProperties": {"^[0-9]+$": {
                "type": "object", "additionalProperties": False, "required": ["scale", "shift"],
                "properties": {"scale": _STATS, "shift": _STATS}}}, "additionalProperties": False}}},
        "model": {"type": "object", "required": ["fingerprint"], "properties": {
            "fingerprint": {"type": "string"}, "name": {"type": "string"}}},
        "tool": {"type": "object"},
    },
}


@dataclass
class Calibration:
    similarity: list[float]  # per sublayer, mean over requests of the per-request mean IO similarity (prefill)
    norm_ratio: list[float]  # per sublayer, mean over requests of ||h'|| / ||h||
    num_prompts: int
    prompt_tokens: int
    data_digest: str
    source: str


@dataclass
class Compensation:
    """What a skipped sublayer outputs instead of h' = h + f(Norm(h)) — the rule every backend applies:

        sublayer j in `sublayers`:  h' = scale_j * h + shift_j   (per channel: scale_j, shift_j have the hidden size)
        any other skipped sublayer: h' = plan.scales[j] * h      (a scalar: the paper's norm ratio, or `token-ratio`)

    Fitted training-free on calibration data (adaskip.calibrate.compensation). Vectors are kept for the offline skip set
    only; FFNs skipped online keep the scalar decode-window ratio.
    """

    rule: str  # one of COMPENSATION_RULES
    sublayers: dict[int, tuple[list[float], list[float]]] = field(default_factory=dict)  # j -> (scale, shift)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "sublayers": {str(j): {"scale": list(a), "shift": list(b)}
                                                 for j, (a, b) in sorted(self.sublayers.items())}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Compensation":
        return cls(rule=d["rule"], sublayers={int(j): ([float(x) for x in v["scale"]], [float(x) for x in v["shift"]])
                                              for j, v in d["sublayers"].items()})


@dataclass
class SkipPlan:
    method: str
    mode: str
    num_layers: int
    budget_unit: str  # "sublayers" (AdaSkip) or "layers" (baselines)
    k: int
    skip: list[int]  # offline skip set (for skipdecode in decode/e2e mode: the full set it grows into)
    scales: list[float]  # per sublayer: h' = scale * h when skipped
    online_enabled: bool
    window: int
    beta: float | None  # online threshold: the K-th largest offline similarity
    fingerprint: str
    model_name: str = ""
    calibration: Calibration | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    tool: dict[str, Any] = field(default_factory=lambda: {"name": "adaskip", "version": __version__})
    compensation: Compensation | None = None  # None: the paper's rule (scalar plan.scales)

    def __post_init__(self) -> None:
        n = 2 * self.num_layers
        check_method(self.method, "the plan's method", PlanError)
        check_mode(self.mode, "the plan's mode", PlanError)
        if len(self.scales) != n:
            raise PlanError(f"plan has {len(self.scales)} scales for {n} sublayers")
        bad = [j for j in self.skip if not 0 <= j < n]
        if bad:
            raise PlanError(f"skip set names sublayers {bad} outside 0..{n - 1}")
        if not all(math.isfinite(s) for s in self.scales):
            raise PlanError("plan scales must be finite numbers")
        if self.calibration is not None:
            c = self.calibration
            if len(c.similarity) != n or len(c.norm_ratio) != n:
                raise PlanError(f"plan calibration has {len(c.similarity)} similarities / {len(c.norm_ratio)} norm "
                                f"ratios for {n} sublayers")
        if self.compensation is not None:
            if self.compensation.rule not in COMPENSATION_RULES:
                raise PlanError(f"unknown compensation rule {self.compensation.rule!r}")
            for j, (a, b) in self.compensation.sublayers.items():
                if j not in self.skip or len(a) != len(b) or not a:
                    raise PlanError(f"compensation for sublayer {j} must match the offline skip set and have equal, "
                                    f"non-empty scale and shift vectors")
                if not all(math.isfinite(x) for x in (*a, *b)):
                    raise PlanError(f"compensation for sublayer {j} has non-finite values")
        expected = self.k if self.budget_unit == "sublayers" else None
        if expected is not None and len(self.skip) != expected:
            raise PlanError(f"plan budget says K={self.k} sublayers but the skip set has {len(self.skip)}")

    @property
    def num_sublayers(self) -> int:
        return 2 * self.num_layers

    # -- JSON --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": PLAN_FORMAT, "version": PLAN_VERSION, "method": self.method, "mode": self.mode,
            "num_layers": self.num_layers, "budget": {"unit": self.budget_unit, "k": self.k},
            "skip": list(self.skip), "scales": list(self.scales),
            "online": {"enabled": self.online_enabled, "window": self.window, "beta": self.beta},
            "calibration": asdict(self.calibration) if self.calibration else None,
            "selection": self.selection,
            "model": {"fingerprint": self.fingerprint, "name": self.model_name},
            "tool": self.tool,
        }
        if self.compensation is not None:  # version 1 files stay byte-identical (and keep their digests)
            d["version"], d["compensation"] = 2, self.compensation.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, d: Any) -> "SkipPlan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not an adaskip skip plan (expected format {PLAN_FORMAT!r})")
        if d.get("version") not in PLAN_VERSIONS:
            raise PlanError(f"skip plan version {d.get('version')!r} is not supported (this adaskip reads "
                            f"{', '.join(map(str, PLAN_VERSIONS))}); rebuild the plan with adaskip-build")
        if d.get("version") == 1 and d.get("compensation") is not None:
            raise PlanError("invalid skip plan: a version 1 plan has no compensation (version 2 adds it)")
        try:
            jsonschema.validate(d, SCHEMA)
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
            raise PlanError(f"invalid skip plan at {where}: {e.message}") from None
        calib = d.get("calibration")
        try:
            return cls._from_valid_dict(d, calib)
        except (TypeError, ValueError) as e:
            raise PlanError(f"invalid skip plan: {e}") from None

    @classmethod
    def _from_valid_dict(cls, d: dict[str, Any], calib: dict[str, Any] | None) -> "SkipPlan":
        return cls(
            method=d["method"], mode=d["mode"], num_layers=d["num_layers"], budget_unit=d["budget"]["unit"],
            k=d["budget"]["k"], skip=list(d["skip"]), scales=[float(x) for x in d["scales"]],
            online_enabled=d["online"]["enabled"], window=d["online"]["window"], beta=d["online"]["beta"],
            fingerprint=d["model"]["fingerprint"], model_name=d["model"].get("name", ""),
            calibration=Calibration(**calib) if calib else None, selection=d.get("selection") or {},
            tool=d["tool"],
            compensation=Compensation.from_dict(d["compensation"]) if d.get("compensation") else None)

    @classmethod
    def load(cls, path: str | Path) -> "SkipPlan":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"skip plan {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanError(f"skip plan {path} is not readable JSON: {e}") from None
        except RecursionError:
            raise PlanError(f"skip plan {path} is nested too deeply") from None
        try:
            return cls.from_dict(data)
        except RecursionError:  # the schema check walks a hand-made deep nesting
            raise PlanError(f"skip plan {path} is nested too deeply") from None

    def check_model(self, fingerprint: str, num_layers: int) -> None:
        """Refuse a plan calibrated for another model (an engine must never run a plan on weights it was not fitted to)."""
        if num_layers != self.num_layers:
            raise PlanError(f"plan is for a {self.num_layers}-layer model; this model has {num_layers} layers")
        if fingerprint != self.fingerprint:
            raise PlanError(f"plan was built for model {self.fingerprint[:19]}… ({self.model_name or 'unnamed'}), "
                            f"not this one ({fingerprint[:19]}…); rebuild it with adaskip-build")


# -- selection ---------------------------------------------------------------------------------------------------

def sublayer_name(j: int) -> str:
    """Sublayer j as people read it: attention of layer j // 2 (even j) or its FFN (odd j), e.g. attn16, ffn8."""
    return f"{'attn' if j % 2 == 0 else 'ffn'}{j // 2}"


def rank_by_similarity(similarity: list[float]) -> list[int]:
    """All sublayers ranked most similar (least important) first; ties broken by index for determinism."""
    return sorted(range(len(similarity)), key=lambda j: (-similarity[j], j))


def adaskip_plan(calibration: Calibration, k: int, mode: str, fingerprint: str, model_name: str = "",
                 window: int = DEFAULT_WINDOW, online: bool = True, selection: dict[str, Any] | None = None,
                 order: list[int] | None = None, scales: list[float] | None = None,
                 compensation: Compensation | None = None) -> SkipPlan:
    """AdaSkip: skip the K most IO-similar sublayers, each replaced by its norm ratio times its input.

    `order` replaces the similarity ranking by another selection rule's (the first K are skipped); `scales` and
    `compensation` replace the paper's scalar norm ratios (per-channel vectors are kept for the chosen K only).
    """
    n = len(calibration.similarity)
    if not 0 <= k <= n:
        raise PlanError(f"--skip must be between 0 and {n} (the model has {n} sublayers); got {k}")
    if order is not None and (len(order) < k or len(set(order)) != len(order) or not all(0 <= j < n for j in order)):
        raise PlanError(f"a selection order must name at least K={k} distinct sublayers of 0..{n - 1}")
    chosen = (rank_by_similarity(calibration.similarity) if order is None else list(order))[:k]
    # beta = the K-th largest offline similarity (for the similarity ranking: the smallest one inside the offline
    # set); with K = 0 there is no threshold and nothing online.
    beta = sorted(calibration.similarity, reverse=True)[k - 1] if chosen else None
    if compensation is not None:
        compensation = Compensation(compensation.rule,
                                    {j: v for j, v in compensation.sublayers.items() if j in chosen})
    return SkipPlan(
        method="adaskip", mode=mode, num_layers=n // 2, budget_unit="sublayers", k=k, skip=chosen,
        scales=[float(r) for r in (calibration.norm_ratio if scales is None else scales)],
        online_enabled=online and mode != "prefill", window=window, beta=beta, fingerprint=fingerprint,
        model_name=model_name, calibration=calibration, selection=selection or {"rule": "k", "k": k},
        compensation=compensation)


def baseline_layers(method: str, num_layers: int, k: int) -> list[int]:
    """Whole layers a baseline skips at budget k, exactly as the reference code defines them."""
    if not 0 <= k <= num_layers:
        raise PlanError(f"budget k must be between 0 and {num_layers} layers; got {k}")
    if method == "early-exit":
        return [i for i in range(num_layers) if num_layers - i <= k]  # the last k layers
    if method == "skipdecode":
        return [i for i in range(num_layers) if 1 <= i <= k]  # layers 1..k, layer 0 kept
    if method == "unified":
        if k == 0:
            return []
        step = num_layers // k
        if step < 2:  # idx % 1 == 1 never holds: the reference rule would silently skip nothing
            raise PlanError(f"unified skipping needs k <= {num_layers // 2} for a {num_layers}-layer model; got {k}")
        return [i for i in range(num_layers) if i % step == 1]
    raise PlanError(f"{method!r} is not a baseline; baselines: early-exit, skipdecode, unified")


def baseline_plan(method: str, num_layers: int, k: int, mode: str, fingerprint: str, model_name: str = "",
                  calibration: Calibration | None = None) -> SkipPlan:
    """A baseline skips whole layers (both sublayers) and passes the hidden state through unchanged."""
    layers = baseline_layers(method, num_layers, k)
    skip = sorted(j for i in layers for j in (2 * i, 2 * i + 1))
    return SkipPlan(
        method=method, mode=mode, num_layers=num_layers, budget_unit="layers", k=k, skip=skip,
        scales=[1.0] * (2 * num_layers), online_enabled=False, window=DEFAULT_WINDOW, beta=None,
        fingerprint=fingerprint, model_name=model_name, calibration=calibration,
        selection={"rule": "baseline", "layers": layers})


SKIPDECODE_HORIZON = 512  # decode steps over which SkipDecode's set grows (the reference's MAX_GEN_LEN)


def skipdecode_layers_at(step: int, num_layers: int, k: int) -> list[int]:
    """SkipDecode: the layers skipped in forward `step` of a request, growing from layer 1 to layers 1..k.

    `step` 0 is the request's prefill (mode e2e), step t >= 1 its decode step t. Reference (ASISys/AdaSkip, the
    SkipDecode baseline): idx <= ceil(c / MAX_GEN_LEN * (k - 1)) + 1, capped at k, layer 0 always kept, where c counts
    the request's decode forwards before this one (0 at decode step 1, so step 1 skips layer 1 only) and MAX_GEN_LEN
    is its tasks' max_new_tokens (512 for every decode and e2e task it runs). A fresh request's counter is 0, so its
    prefill skips layer 1 only, a subset of every decode step's set: every layer whose attention runs in decode ran
    in prefill and has its K/V. (The reference's e2e variant resets the counter only after a prefill, so a prefill
    reads the previous request's final count: see SkipLayout.prefill_skip.)
    """
    if k == 0:
        return []
    counter = max(step - 1, 0)
    limit = min(k, math.ceil(counter / SKIPDECODE_HORIZON * (k - 1)) + 1)
    return [i for i in range(1, num_layers) if i <= limit]


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
