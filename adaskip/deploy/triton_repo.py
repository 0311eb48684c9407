"""Write a Triton Inference Server model repository that serves an adaskip engine dir with the Python backend.

One Python-backend model per engine (see docs/triton.md): the model runs adaskip's in-flight batching scheduler (or,
for engines without KV slots, the Generator in static batches) in its own process, so the skip policy, the KV cache
and the streaming all stay together, and a decoupled variant streams tokens.

    <repo>/<name>/config.pbtxt      inputs, outputs, batching, instances, decoupled policy, parameters
    <repo>/<name>/1/model.py        adaskip/deploy/model.py, copied
    <repo>/<name>/1/engine/         the engine dir (hard links where possible, else a copy), unless referenced
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from adaskip import __version__
from adaskip.engine_dir import open_engine_dir, swap_into_place
from adaskip.errors import AdaskipError, InputError
from adaskip.runtime.registry import supports_slots
from adaskip.runtime.scheduler import SchedulerOptions

CONFIG = "config.pbtxt"
VERSION = "1"
ENGINE_SUBDIR = "engine"
MODEL_TEMPLATE = Path(__file__).with_name("model.py")

# The request/response schema (names as in TensorRT-LLM's backend where one exists). dims exclude the batch dim.
INPUTS: list[tuple[str, str, list[int], bool]] = [  # name, type, dims, optional
    ("text_input", "TYPE_STRING", [1], False),
    ("max_tokens", "TYPE_INT32", [1], False),
    ("temperature", "TYPE_FP32", [1], True),  # 0 (default): greedy
    ("top_k", "TYPE_INT32", [1], True),  # 0: off
    ("top_p", "TYPE_FP32", [1], True),  # 1: off
    ("random_seed", "TYPE_UINT64", [1], True),
    ("stop_words", "TYPE_STRING", [-1], True),  # stop strings; the model's end-of-sequence tokens always stop
    ("chat", "TYPE_BOOL", [1], True),  # wrap text_input in the model's chat template
    ("stream", "TYPE_BOOL", [1], True),  # decoupled models only: one response per token
]
OUTPUTS: list[tuple[str, str, list[int]]] = [
    ("text_output", "TYPE_STRING", [1]),
    ("output_ids", "TYPE_INT32", [-1]),
    ("finish_reason", "TYPE_STRING", [1]),  # "stop" | "length"
    ("prompt_tokens", "TYPE_INT32", [1]),
    ("prefill_skipped", "TYPE_INT32", [-1]),  # sublayer ids (2i attention, 2i+1 FFN of layer i)
    ("decode_skipped_offline", "TYPE_INT32", [-1]),
    ("decode_skipped_online", "TYPE_INT32", [-1]),  # FFNs this request added online
    ("kv_bytes_saved", "TYPE_INT64", [1]),  # KV-cache bytes the skipped attention saves (prompt + max_tokens)
]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
ENGINE_MODES = ("copy", "reference")  # the engine copied into the model (self-contained) or referenced by path


@dataclass
class TritonModelOptions:
    name: str = "adaskip"
    instances: int = 1  # Python-backend instances = processes, each with its own engine, scheduler and KV memory
    max_batch_size: int = 8  # requests Triton hands one execute() (static batching: rows of one batch); 0: none
    decoupled: bool = False  # streaming (gRPC stream, HTTP generate_stream; HTTP infer refuses decoupled models)
    threads: int = 0  # ONNX Runtime intra-op threads per instance; 0: ADASKIP_THREADS or all cores
    engine_mode: str = "copy"  # "copy" (self-contained) or "reference" (absolute path to the engine dir)
    python_env: str = "auto"  # EXECUTION_ENV_PATH: "auto" (this venv), "none", or a path
    queue_delay_us: int = 2000  # how long the dynamic batcher waits for more requests
    max_queue_size: int = 64  # requests waiting beyond it are refused at once (UNAVAILABLE), not queued for minutes
    max_input_bytes: int = 0  # text_input larger than this is refused before tokenizing; 0: 32 bytes per context token
    # in-flight batching (engines with KV slots; adaskip/runtime/scheduler.py): the scheduler's admission queue is
    # max_queue_size too
    slots: int = SchedulerOptions.slots  # KV slots: requests decoding or prefilling at once, per instance
    slot_capacity: int = 0  # positions per slot (prompt + max_tokens); 0: the model's context, at most 2048
    step_tokens: int = SchedulerOptions.step_tokens  # tokens per step: one per decoding row, the rest prompt chunks

    def validate(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise InputError(f"model name {self.name!r} must be letters, digits, '_', '.', '-' (not starting with "
                             f"'.' or '-')")
        if self.instances < 1:
            raise InputError(f"--instances must be >= 1; got {self.instances}")
        if self.max_batch_size < 0:
            raise InputError(f"--max-batch-size must be >= 0 (0: no batching); got {self.max_batch_size}")
        if self.threads < 0:
            raise InputError(f"--threads must be >= 0; got {self.threads}")
        if not 1 <= self.max_queue_size <= 1 << 20:
            raise InputError(f"--max-queue-size must be in 1..{1 << 20}; got {self.max_queue_size}")
        if not 0 <= self.max_input_bytes <= 1 << 30:
            raise InputError(f"--max-input-bytes must be in 0..{1 << 30} (0: 32 bytes per context token); got "
                             f"{self.max_input_bytes}")
        if self.queue_delay_us < 0:
            raise InputError(f"--queue-delay-us must be >= 0; got {self.queue_delay_us}")
        if self.engine_mode not in ENGINE_MODES:
            raise InputError(f"engine mode must be 'copy' or 'reference'; got {self.engine_mode!r}")
        if self.slot_capacity < 0:
            raise InputError(f"--slot-capacity must be >= 0 (0: the model's context, at most "
                             f"{SchedulerOptions.slot_capacity}); got {self.slot_capacity}")
        self.check_scheduler()

    def scheduler(self, context: int | None = None) -> SchedulerOptions:
        """The scheduler options the model will run (the slot capacity resolved against the model's context)."""
        capacity = self.slot_capacity or min(SchedulerOptions.slot_capacity, context or SchedulerOptions.slot_capacity)
        return SchedulerOptions(slots=self.slots, slot_capacity=capacity, max_queue=self.max_queue_size,
                                step_tokens=self.step_tokens)

    def check_scheduler(self, context: int | None = None) -> None:
        try:
            self.scheduler(context).validate(context)
        except InputError as e:
            raise InputError(f"{e} (adaskip-deploy --slots / --slot-capacity / --step-tokens)") from None


def model_scheduler_options(params: dict[str, str], context: int) -> SchedulerOptions:
    """The scheduler options a deployed model runs, read back from its config.pbtxt parameters (model_config)."""
    d = TritonModelOptions()

    def number(key: str, default: int) -> int:
        return int(params.get(key) or default)

    return TritonModelOptions(slots=number("slots", d.slots), slot_capacity=number("slot_capacity", 0),
                              max_queue_size=number("max_queue_size", d.max_queue_size),
                              step_tokens=number("step_tokens", d.step_tokens)).scheduler(context)


def resolve_python_env(choice: str) -> str | None:
    """The Python environment the backend stub runs model.py in (Triton's EXECUTION_ENV_PATH parameter).

    "auto": the virtual environment adaskip runs in now (so the stub imports this adaskip and its dependencies);
    none when running from a base interpreter, whose site-packages the stub sees anyway."""
    if choice == "none":
        return None
    if choice == "auto":
        if sys.prefix == sys.base_prefix or not (Path(sys.prefix) / "bin" / "activate").is_file():
            return None
        return str(Path(sys.prefix).absolute())
    env = Path(choice).expanduser().absolute()
    if not (env / "bin" / "activate").is_file():
        raise InputError(f"--python-env {choice}: not a Python environment (no bin/activate); give a virtualenv or "
                         f"conda environment directory, 'auto' or 'none'")
    return str(env)


def _pb_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string literal is a valid protobuf text-format string


def model_config(opts: TritonModelOptions, engine_param: str, python_env: str | None, plan_digest: str) -> str:
    """config.pbtxt for one adaskip model."""
    lines = [f"name: {_pb_string(opts.name)}", 'backend: "python"', f"max_batch_size: {opts.max_batch_size}"]
    if opts.decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    if opts.max_batch_size > 0:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {opts.queue_delay_us} "
                     f"default_queue_policy {{ max_queue_size: {opts.max_queue_size} }} }}")
    ins = [f'  {{ name: "{n}" data_type: {t} dims: {d} optional: {str(o).lower()} }}' for n, t, d, o in INPUTS]
    outs = [f'  {{ name: "{n}" data_type: {t} dims: {d} }}' for n, t, d in OUTPUTS]
    lines += ["input [", ",\n".join(ins), "]", "output [", ",\n".join(outs), "]"]
    lines.append(f"instance_group [ {{ count: {opts.instances} kind: KIND_CPU }} ]")
    params = {"engine_dir": engine_param, "threads": str(opts.threads), "adaskip_version": __version__,
              "plan_digest": plan_digest, "max_input_bytes": str(opts.max_input_bytes),
              "max_queue_size": str(opts.max_queue_size), "slots": str(opts.slots),
              "slot_capacity": str(opts.slot_capacity), "step_tokens": str(opts.step_tokens)}
    if python_env:
        params["EXECUTION_ENV_PATH"] = python_env
    for key, value in params.items():
        lines.append(f"parameters {{ key: {_pb_string(key)} value {{ string_value: {_pb_string(value)} }} }}")
    return "\n".join(lines) + "\n"


def _link_or_copy(src: str, dst: str) -> str:
    """Engine files are never rewritten in place (builds replace whole dirs), so a hard link is a safe, free copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _repo_models(repo: Path) -> list[str]:
    """Names of the models in an existing repository; refuses a directory that holds anything else."""
    if not repo.is_dir():
        raise InputError(f"--repo {repo} exists and is not a directory")
    models, other = [], []
    for entry in repo.iterdir():
        (models if entry.is_dir() and (entry / CONFIG).is_file() else other).append(entry.name)
    if other:
        raise InputError(f"--repo {repo} exists and is not a Triton model repository (it holds {sorted(other)[:3]}, "
                         f"not only model directories with {CONFIG}); choose another --repo")
    return sorted(models)


def batching(engine: str | Path, opts: TritonModelOptions) -> str:
    """How the deployed model will batch requests, in words (the model decides the same way when it loads)."""
    ed = open_engine_dir(engine)
    if supports_slots(ed):
        s = opts.scheduler(ed.spec.max_position_embeddings)
        return (f"in-flight batching: {s.slots} slots of {s.slot_capacity} positions, {s.step_tokens} tokens per "
                f"step, queue {s.max_queue}")
    return (f"static batching (batches of up to {max(opts.max_batch_size, 1)}): this engine runs whole batches "
            f"only; in-flight batching needs the `ort` graph variant")


SERVABLE_BACKENDS = ("ort", "torch", "tensorrt")  # what adaskip's runtime loads (tensorrt: on a GPU server)


def write_model_repository(engine: str | Path, repo: str | Path, opts: TritonModelOptions,
                           force: bool = False) -> Path:
    """Add model `opts.name` serving `engine` to the repository `repo` (created if missing); returns the model dir.

    The model dir is assembled next to the repository and renamed into place, so an interrupted or failed deploy
    leaves the repository as it was. `force` replaces an earlier model of the same name, nothing else."""
    opts.validate()
    ed = open_engine_dir(engine)  # refuse a corrupt or foreign engine before copying anything
    if ed.backend not in SERVABLE_BACKENDS:  # fail here, not later inside tritonserver at model load
        raise InputError(f"{ed.root}: a {ed.backend!r} engine dir cannot be served by the Python backend model "
                         f"(servable: {', '.join(SERVABLE_BACKENDS)})")
    opts.check_scheduler(ed.spec.max_position_embeddings)  # here, not at model load inside tritonserver
    engine_root = ed.root.resolve()
    python_env = resolve_python_env(opts.python_env)
    repo = Path(repo).absolute()
    existing = _repo_models(repo) if repo.exists() else []
    target = repo / opts.name
    if opts.name in existing and not force:
        raise InputError(f"{target} already exists (pass --force to replace that model)")
    if repo.resolve() == engine_root or engine_root in repo.resolve().parents:
        raise InputError("--repo must not be inside the engine dir")
    repo.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repo.name}.partial-", dir=repo.parent))

    def _term(signum, frame):  # SIGTERM -> exception, so the cleanup below runs
        raise KeyboardInterrupt(f"signal {signum}")

    import threading

    previous = signal.signal(signal.SIGTERM, _term) if threading.current_thread() is threading.main_thread() else None
    try:
        model = staging / opts.name
        version = model / VERSION
        version.mkdir(parents=True)
        shutil.copy2(MODEL_TEMPLATE, version / "model.py")
        if opts.engine_mode == "copy":
            shutil.copytree(engine_root, version / ENGINE_SUBDIR, copy_function=_link_or_copy)
            engine_param = ENGINE_SUBDIR
        else:
            engine_param = str(engine_root)
        (model / CONFIG).write_text(model_config(opts, engine_param, python_env, ed.plan.digest()), encoding="utf-8")
        repo.mkdir(exist_ok=True)
        # --force: the earlier model moves aside and comes back if the swap fails
        swap_into_place(model, target, staging / f".old-{opts.name}")
    except OSError as e:
        raise AdaskipError(f"cannot write the model repository {repo}: {e.strerror or e}"
                           f"{f' ({e.filename})' if e.filename else ''}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return target

