"""BuildOptions: what adaskip-build takes, grouped as the build uses it, each default and each check in one place.

    selection     which sublayers to skip: a method and a budget to calibrate for, or an existing plan
    calibration   what to calibrate on (adaskip/calibrate/corpus.py)
    engine        the backend and how its engine is exported; `engine.tensorrt` for --backend tensorrt
                  (adaskip/export/tensorrt/options.py)

The CLI (adaskip/cli/build.py) fills it from flags whose defaults it reads from these dataclasses, as trtllm-build
fills its BuildConfig; a library caller fills it directly. `validate()` refuses bad options before a model is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from adaskip.calibrate.budget import check_bound
from adaskip.calibrate.corpus import CalibrationOptions
from adaskip.calibrate.selection import SELECTIONS, GreedyRecipe
from adaskip.errors import InputError, check_choice
from adaskip.export.onnx.ort import KV_DTYPES as KV_CACHE_TYPES
from adaskip.export.onnx.quantize import QUANTIZE_CHOICES
from adaskip.export.onnx.variants import REQUESTS, check_request
from adaskip.export.tensorrt.options import TensorRTOptions
from adaskip.export.trtllm.parallel import TrtllmOptions
from adaskip.model.load import check_dtype
from adaskip.plan import COMPENSATION_RULES, DEFAULT_WINDOW, check_method, check_mode

# ort: ONNX graph on ONNX Runtime (default); torch: the reference engine
# trtllm-checkpoint: TensorRT-LLM checkpoint (config.json + rank{N}.safetensors) + model class for trtllm-build
# tensorrt: the portable ONNX graph built into a serialized TensorRT engine (adaskip/export/tensorrt/)
BACKENDS = ("ort", "torch", "trtllm-checkpoint", "tensorrt")
# stand-ins for a skipped sublayer (adaskip/calibrate/compensation.py): the paper's scalar norm ratio, or one fitted on
# the calibration pass (per-token ratio, per-channel scale, per-channel affine a * h + b)
STAND_INS = COMPENSATION_RULES
# ort backend: "ort" (ONNX Runtime's fused contrib ops), "portable" (standard ops only), auto: ort where the plan
# allows it (adaskip/export/onnx/variants.py decides and checks)
GRAPH_VARIANTS = REQUESTS
QUANTIZATIONS = QUANTIZE_CHOICES  # weight-only int4 / int8 MatMuls and LM head (MatMulNBits), ort backend
KV_DTYPES = tuple(KV_CACHE_TYPES)  # the ort graph variant's KV cache (GroupQueryAttention's cache type)


def check_backend(backend: str) -> None:
    check_choice(backend, BACKENDS, "--backend")


# --select retrieval: 24 probes of 1024 tokens unless told (the settings of the evaluated answers-first plans; on
# Gemma-3-270M the orders from 1k and 2k probes nearly agree, and longer probes cost proportionally more)
DEFAULT_PROBES = 24
DEFAULT_PROBE_TOKENS = 1024
COST_CONTEXT = 4096  # the context the cost model assumes unless --context-len (or a shorter model context) says


@dataclass
class SelectionOptions:
    method: str = "adaskip"
    skip: int | None = None  # K sublayers (adaskip) or k layers (baselines)
    alpha: float | None = None  # target ideal speedup (adaskip)
    max_kl: float | None = None  # quality budget: largest K whose held-out next-token KL stays <= this (adaskip)
    mode: str = "e2e"
    context_len: int | None = None  # for the cost model; None: min(COST_CONTEXT, the model's context)
    window: int = DEFAULT_WINDOW
    online: bool = True
    stand_in: str = "norm-ratio"  # what replaces a skipped sublayer: the paper's rule or a fitted per-channel map
    select: str = "similarity"  # the ranking K is taken from: the paper's, or a greedy order (calibrate/selection.py)
    select_candidates: int | None = None  # kl / retrieval: the most IO-similar sublayers the greedy tries
    probes: int | None = None  # retrieval: synthetic retrieval prompts the greedy scores
    probe_tokens: int | None = None  # retrieval: tokens per probe (None: min(1024, --context-len), set by build())
    plan: str | None = None  # reuse an existing plan instead of calibrating

    # what a plan file decides, by flag: refused next to --plan rather than silently ignored
    _PLAN_DECIDES = (("--method", "method"), ("--skip", "skip"), ("--alpha", "alpha"), ("--max-kl", "max_kl"),
                     ("--mode", "mode"),
                     ("--window", "window"), ("--no-online", "online"), ("--stand-in", "stand_in"),
                     ("--select", "select"), ("--select-candidates", "select_candidates"), ("--probes", "probes"),
                     ("--probe-tokens", "probe_tokens"))

    def overridden(self) -> list[str]:
        """The flags a plan decides that are set away from their defaults."""
        default = SelectionOptions()
        return [flag for flag, name in self._PLAN_DECIDES if getattr(self, name) != getattr(default, name)]

    def validate(self) -> None:
        check_method(self.method)
        check_mode(self.mode)
        if self.plan is None:
            if sum(v is not None for v in (self.skip, self.alpha, self.max_kl)) != 1:
                raise InputError("give exactly one of --skip K, --alpha A or --max-kl X (or --plan FILE)")
            if self.alpha is not None and self.method != "adaskip":
                raise InputError("--alpha selects AdaSkip sublayers; baselines take --skip k (whole layers)")
            if self.max_kl is not None:
                check_bound(self.max_kl)
                if self.method != "adaskip":
                    raise InputError("--max-kl selects AdaSkip sublayers; baselines take --skip k (whole layers)")
            if self.skip is not None and self.skip < 0:
                raise InputError(f"--skip must be >= 0; got {self.skip}")
        check_choice(self.stand_in, STAND_INS, "--stand-in")
        if self.stand_in != "norm-ratio" and self.method != "adaskip":
            raise InputError("--stand-in applies to AdaSkip plans; baselines skip whole layers with no stand-in")
        self._validate_select()
        if self.window < 1:
            raise InputError(f"--window must be >= 1; got {self.window}")
        if self.context_len is not None and self.context_len < 1:
            raise InputError(f"--context-len must be >= 1; got {self.context_len}")

    def _validate_select(self) -> None:
        check_choice(self.select, SELECTIONS, "--select")
        if self.select != "similarity" and self.method != "adaskip":
            raise InputError(f"--select {self.select} ranks AdaSkip sublayers; baselines skip fixed whole layers")
        for flag, value, selects in (("--select-candidates", self.select_candidates, ("kl", "retrieval")),
                                     ("--probes", self.probes, ("retrieval",)),
                                     ("--probe-tokens", self.probe_tokens, ("retrieval",))):
            if value is not None and self.select not in selects:
                raise InputError(f"{flag} applies to --select {' or '.join(selects)}; this build selects by "
                                 f"{self.select}")
        if self.select != "similarity":
            self.recipe().check()

    def recipe(self) -> GreedyRecipe:
        """The greedy order's recipe (--select kl / retrieval); unset counts from the recipe's defaults."""
        def given(value: int | None, default: int) -> int:
            return default if value is None else value

        return GreedyRecipe.for_select(self.select, given(self.select_candidates, GreedyRecipe().candidates),
                                       given(self.probes, DEFAULT_PROBES), given(self.probe_tokens, DEFAULT_PROBE_TOKENS))


@dataclass
class EngineOptions:
    backend: str = "ort"
    dtype: str = "float32"  # weights dtype
    quantize: str | None = None  # "int4" / "int8": weight-only MatMuls and LM head (ort backend)
    graph_variant: str = "auto"  # ort backend: see GRAPH_VARIANTS
    kv_dtype: str = "float32"  # ort graph variant: the KV cache's dtype (float16: half the memory, slower on CPU;
    # int8: a quarter, per-channel scales fitted on the calibration prompts)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)  # --backend tensorrt only
    trtllm: TrtllmOptions = field(default_factory=TrtllmOptions)  # --backend trtllm-checkpoint only

    def validate(self) -> None:
        check_backend(self.backend)
        check_dtype(self.dtype, "--dtype", InputError)
        check_request(self.backend, self.graph_variant)
        if self.quantize is not None:
            check_choice(self.quantize, QUANTIZATIONS, "--quantize")
            if self.backend != "ort":
                raise InputError(f"--quantize {self.quantize} is available for the ort backend only")
        check_choice(self.kv_dtype, KV_DTYPES, "--kv-dtype")
        if self.kv_dtype != "float32" and (self.backend != "ort" or self.graph_variant == "portable"):
            raise InputError(f"--kv-dtype {self.kv_dtype} is available for the ort backend's ort graph variant only")
        self.tensorrt.validate()
        if self.backend != "tensorrt":
            given = self.tensorrt.given()
            if given:
                raise InputError(f"{', '.join(given)}: TensorRT engine options, for --backend tensorrt only")
        self.trtllm.validate()
        if self.backend != "trtllm-checkpoint" and self.trtllm.given():
            raise InputError(f"{', '.join(self.trtllm.given())}: TensorRT-LLM checkpoint options, for --backend "
                             f"trtllm-checkpoint only")


@dataclass
class BuildOptions:
    model: str
    output: str
    selection: SelectionOptions = field(default_factory=SelectionOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)
    force: bool = False  # replace an existing output directory
    progress: bool = True

    def validate(self) -> None:
        """Everything that can be refused before a model is loaded (the TensorRT environment and the limits against
        the model's context are checked by build(), still before calibrating)."""
        sel = self.selection
        sel.validate()
        if sel.plan is not None:
            given = sel.overridden() + [flag for flag, v in (("--calib", self.calibration.data),
                                                             ("--calibration", self.calibration.reuse)) if v is not None]
            if given:
                raise InputError(f"--plan fixes the selection; drop {', '.join(given)} (or drop --plan)")
        else:
            self.calibration.validate()
            if self.calibration.reuse is not None:
                for flag, given in (("a fitted --stand-in", sel.stand_in != "norm-ratio"),
                                    (f"--select {sel.select}", sel.select != "similarity")):
                    if given:
                        raise InputError(f"--calibration carries the paper's statistics only; {flag} needs a pass "
                                         f"(on the calibration prompts)")
        self.engine.validate()
        if sel.stand_in != "norm-ratio" and self.engine.backend == "trtllm-checkpoint":
            raise InputError("the TensorRT-LLM checkpoint supports the paper's norm-ratio stand-in only")

    def record(self) -> dict[str, Any]:
        """The options as the manifest records them (flat keys, as engine directories have always had them)."""
        e, c = self.engine, self.calibration
        return {"model": self.model, **asdict(self.selection), "calib": c.data, "calib_prompts": c.prompts,
                "calib_tokens": c.tokens, "backend": e.backend, "dtype": e.dtype, "quantize": e.quantize,
                "kv_dtype": e.kv_dtype, "graph_variant": e.graph_variant, **e.tensorrt.record()}
