"""TensorRT-LLM checkpoint (config.json + rank{N}.safetensors) for the Llama family, carrying the skip plan.

Layout (TensorRT-LLM's docs/source/architecture/checkpoint.md): a folder with `config.json` and one
`rank{N}.safetensors` per rank of the mapping (tp_size x pp_size; split rules, local layer names per pipeline stage
and the rank order in parallel.py; the reader that merges ranks back is merge.py). Global weight names follow
TensorRT-LLM's Llama converter (tensorrt_llm/models/llama/convert.py):

    transformer.vocab_embedding.weight, transformer.ln_f.weight, lm_head.weight
    transformer.layers.{i}.input_layernorm.weight
    transformer.layers.{i}.attention.qkv.weight          q, k, v concatenated along the output dim
    transformer.layers.{i}.attention.dense.weight        o_proj
    transformer.layers.{i}.post_layernorm.weight
    transformer.layers.{i}.mlp.fc.weight                 HF gate_proj: the branch that goes through the activation
    transformer.layers.{i}.mlp.gate.weight               HF up_proj: the linear multiplier
    transformer.layers.{i}.mlp.proj.weight               down_proj

The fc/gate naming is TensorRT-LLM's, not HF's: its converters store HF `up_proj` as `mlp.gate` and HF `gate_proj`
as `mlp.fc` (commented "MLP trt Gate to mlp fc" in models/llama/convert.py; nemotron_nas/convert.py maps them the
same way), because GatedMLP computes proj(act(fc(x)) * gate(x)).

The skip plan is carried the way TensorRT-LLM's own NAS models carry per-layer structure: `layer_configs`, one entry
per decoder layer, exactly in the shape of nemotron_nas' DeciLayerConfig (`attention.impl` in attention | linear |
no_op with `num_key_value_heads`, `ffn.impl` in mlp | linear | no_op with `intermediate_size`). A sublayer that the
plan skips in every forward is `no_op` and has no weights (and, for attention, no KV cache). DeciLM's no_op is
h' = h; AdaSkip's skipped sublayer is h' = r_j * h, so the scale cannot live in `layer_configs` (DeciLayerConfig
rejects unknown keys): it sits beside it in the `adaskip` extension (the checkpoint config "is extensible"), with
the role of every sublayer (never / always / dynamic), the online policy (W, beta, the FFNs it may add) and the
whole plan. With every scale 1.0 (the baselines) the no_op layers are exactly DeciLM's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import torch

from adaskip.errors import EngineDirError, InputError
from adaskip.export.trtllm.parallel import RankMapping, TrtllmOptions, rank_tensors
from adaskip.model.spec import ModelSpec, layer_role
from adaskip.layout import SkipLayout
from adaskip.plan import SkipPlan

CONFIG = "config.json"
MODEL_CLS_FILE = "adaskip_trtllm_model.py"  # the model class trtllm-build loads with --model_cls_file
MODEL_CLS_NAME = "AdaSkipLlamaForCausalLM"
EXTENSION_FORMAT = "adaskip.trtllm-checkpoint"
EXTENSION_VERSION = 2  # 2: the `parallel` record (tp/pp mapping, pipeline stages, who makes each skip decision)
SUPPORTED_FAMILIES = ("llama", "mistral")  # TensorRT-LLM builds both with its Llama model (MistralForCausalLM -> LLaMA)
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_ROLES = ("never", "always", "dynamic")

_SUBLAYER = {"type": "object", "required": ["sublayer", "role", "scale", "online"], "additionalProperties": False,
             "properties": {"sublayer": {"type": "integer", "minimum": 0}, "role": {"enum": list(_ROLES)},
                            "scale": {"type": "number"}, "online": {"type": "boolean"}}}
_IMPL_ATTN = {"type": "object", "required": ["impl", "num_key_value_heads"], "additionalProperties": False,
              "properties": {"impl": {"enum": ["attention", "no_op"]},
                             "num_key_value_heads": {"type": ["integer", "null"], "minimum": 1}}}
_IMPL_FFN = {"type": "object", "required": ["impl", "intermediate_size"], "additionalProperties": False,
             "properties": {"impl": {"enum": ["mlp", "no_op"]},
                            "intermediate_size": {"type": ["integer", "null"], "minimum": 1}}}
CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["architecture", "dtype", "logits_dtype", "vocab_size", "hidden_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_size", "intermediate_size",
                 "max_position_embeddings", "hidden_act", "norm_epsilon", "position_embedding_type", "rotary_base",
                 "rotary_scaling", "tie_word_embeddings", "share_embedding_table", "mapping", "quantization",
                 "layer_configs", "adaskip"],
    "properties": {
        "architecture": {"const": "LlamaForCausalLM"},
        "dtype": {"enum": list(_DTYPES.values())},
        "logits_dtype": {"const": "float32"},
        "hidden_act": {"const": "silu"},
        "position_embedding_type": {"const": "rope_gpt_neox"},
        "rotary_scaling": {"type": ["object", "null"]},
        "mapping": {"type": "object", "required": ["world_size", "tp_size", "pp_size"],
                    "properties": {k: {"type": "integer", "minimum": 1} for k in ("world_size", "tp_size", "pp_size")}},
        "use_parallel_embedding": {"type": "boolean"},
        "embedding_sharding_dim": {"enum": [0, 1]},
        "quantization": {"type": "object", "required": ["quant_algo"], "properties": {"quant_algo": {"const": None}}},
        "layer_configs": {"type": "array", "items": {
            "type": "object", "required": ["attention", "ffn"], "additionalProperties": False,
            "properties": {"attention": _IMPL_ATTN, "ffn": _IMPL_FFN}}},
        "adaskip": {"type": "object", "required": ["format", "version", "layers", "online", "engine_io", "plan",
                                                    "plan_digest", "model", "model_cls", "parallel"],
                    "properties": {
                        "format": {"const": EXTENSION_FORMAT}, "version": {"const": EXTENSION_VERSION},
                        "layers": {"type": "array", "items": {
                            "type": "object", "required": ["attention", "ffn"], "additionalProperties": False,
                            "properties": {"attention": _SUBLAYER, "ffn": _SUBLAYER}}},
                        "online": {"type": "object", "required": ["enabled", "window", "beta", "ffn_sublayers"]},
                        "engine_io": {"type": ["object", "null"]},
                        "plan": {"type": "object"},
                        "model": {"type": "object", "required": ["fingerprint", "spec"]},
                        "model_cls": {"type": "object", "required": ["file", "name"]},
                        "parallel": {"type": "object", "required": ["tp_size", "pp_size", "stages", "decisions"]}}},
    },
}


# -- what the checkpoint can express ------------------------------------------------------------------------------

def check_supported(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> None:
    """Refuse, before any work, a model that TensorRT-LLM's Llama layout cannot hold exactly."""
    if spec.family not in SUPPORTED_FAMILIES:
        raise InputError(f"--backend trtllm-checkpoint writes TensorRT-LLM's Llama layout; a {spec.family!r} model "
                         f"is not supported (supported families: {', '.join(SUPPORTED_FAMILIES)})")
    if any(w is not None for w in spec.attention_windows):
        raise InputError("--backend trtllm-checkpoint does not support sliding-window attention (TensorRT-LLM's "
                         "Llama model has full attention only); use --backend torch")
    biases = sorted({r.rsplit(".", 1)[-1] for r in weights if r.endswith("_bias")})
    if biases:
        raise InputError(f"--backend trtllm-checkpoint: this model has linear biases ({', '.join(biases)}), which the "
                         f"Llama layout with adaskip's model class does not carry")
    if spec.activation != "silu":
        raise InputError(f"--backend trtllm-checkpoint supports SiLU-gated FFNs only; got {spec.activation!r}")
    if weights["embed"].dtype not in _DTYPES:
        raise InputError(f"unsupported weight dtype {weights['embed'].dtype} for a TensorRT-LLM checkpoint")


def _rotary_scaling(spec: ModelSpec) -> dict[str, Any] | None:
    """TensorRT-LLM reads `type` (or `rope_type`) and `factor`, and for llama3 the three band parameters."""
    s = spec.rope_scaling
    if s is None:
        return None
    out: dict[str, Any] = {"type": s["type"], "rope_type": s["type"], "factor": float(s["factor"])}
    if s["type"] == "llama3":
        out.update(low_freq_factor=float(s["low_freq_factor"]), high_freq_factor=float(s["high_freq_factor"]),
                   original_max_position_embeddings=int(s["original_max_position_embeddings"]))
    return out


def sublayer_layout(spec: ModelSpec, plan: SkipPlan) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(layer_configs, adaskip layers): the DeciLM-style structure and, beside it, role + scale per sublayer."""
    layout = SkipLayout.from_plan(plan)
    roles, online = layout.roles, set(layout.online_ffns)
    layer_configs, layers = [], []
    for i in range(spec.num_layers):
        a, f = 2 * i, 2 * i + 1
        layer_configs.append({
            "attention": {"impl": "no_op", "num_key_value_heads": None} if roles[a] == "never"
            else {"impl": "attention", "num_key_value_heads": spec.num_kv_heads},
            "ffn": {"impl": "no_op", "intermediate_size": None} if roles[f] == "never"
            else {"impl": "mlp", "intermediate_size": spec.intermediate_size},
        })
        layers.append({
            name: {"sublayer": j, "role": roles[j], "scale": float(plan.scales[j]),
                   "online": j in online}
            for name, j in (("attention", a), ("ffn", f))})
    return layer_configs, layers


# Why every rank ends up with the same decision (the model class implements it; docs/trtllm-checkpoint.md).
DECISIONS = {
    "tensor_parallel": "each engine uses tensor-parallel rank 0's adaskip_skip / adaskip_scale: the model class "
                       "all-reduces rank 0's values with exact zeros from the other ranks (v + 0 = v bit for bit, "
                       "in any reduction order) before any conditional, so every rank takes the same branch; a "
                       "branch holds the row-parallel all-reduce, and ranks that disagreed would deadlock in it",
    "pipeline_parallel": "a stage reads and reports only the columns of the layers it owns (NaN elsewhere): the "
                         "policy of layer i is run for, and fed to, the stage that owns layer i",
}


def parallel_record(num_layers: int, opts: TrtllmOptions) -> dict[str, Any]:
    """The `adaskip.parallel` record: the mapping, each pipeline stage's ranks and layers, and the decision rule."""
    ranks = opts.ranks(num_layers)
    stages = [{"pp_rank": p, "ranks": [r.rank for r in ranks if r.pp_rank == p],
               "layers": list(next(r.layers for r in ranks if r.pp_rank == p))} for p in range(opts.pp_size)]
    return {"tp_size": opts.tp_size, "pp_size": opts.pp_size, "stages": stages, "decisions": DECISIONS}


def _engine_io(spec: ModelSpec, layers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The extra engine tensors the model class adds when some sublayer is decided at run time (else none: the
    engine is a plain TensorRT-LLM engine any of its runtimes can serve)."""
    if not any(layer[k]["role"] == "dynamic" for layer in layers for k in ("attention", "ffn")):
        return None
    n = spec.num_sublayers
    return {
        "inputs": {"adaskip_skip": {"dtype": "bool", "shape": ["num_tokens", n],
                                    "meaning": "per token: its request's SkipPolicy mask for this forward"},
                   "adaskip_scale": {"dtype": "float32", "shape": ["num_tokens", n],
                                     "meaning": "per token: h' = scale * h where skipped (offline r_j or online mean)"}},
        "outputs": {"adaskip_similarity": {"dtype": "float32", "shape": ["num_tokens", n]},
                    "adaskip_norm_ratio": {"dtype": "float32", "shape": ["num_tokens", n]}},
        "notes": "requires remove_input_padding (packed tokens); in a generation step each request has one token, "
                 "so row t of the outputs is request t's decode statistics; NaN where a sublayer did not run or "
                 "belongs to another pipeline stage; with several ranks see adaskip.parallel.decisions",
    }


def build_config(spec: ModelSpec, plan: SkipPlan, fingerprint: str, dtype: str,
                 opts: TrtllmOptions | None = None) -> dict[str, Any]:
    opts = opts or TrtllmOptions()
    layer_configs, layers = sublayer_layout(spec, plan)
    layout = SkipLayout.from_plan(plan)
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_size": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "hidden_act": "silu",
        "norm_epsilon": spec.norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": spec.rope_theta,
        "rotary_scaling": _rotary_scaling(spec),
        "attn_bias": False,
        "mlp_bias": False,
        # lm_head.weight is always written (a copy of the embedding when tied), as TensorRT-LLM's own Llama
        # converter does for tied models, so nothing depends on an embedding-sharing build optimization.
        "tie_word_embeddings": spec.tie_word_embeddings,
        "share_embedding_table": False,
        **opts.config_fields(),  # mapping, use_parallel_embedding, embedding_sharding_dim
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "layer_configs": layer_configs,
        "adaskip": {
            "format": EXTENSION_FORMAT, "version": EXTENSION_VERSION,
            "method": plan.method, "mode": plan.mode,
            "layers": layers,
            "online": {"enabled": layout.learns_online, "window": plan.window, "beta": plan.beta,
                       "ffn_sublayers": list(layout.online_ffns)},
            "engine_io": _engine_io(spec, layers),
            "plan": plan.to_dict(),
            "plan_digest": plan.digest(),
            "model": {"fingerprint": fingerprint, "spec": spec.to_dict()},
            "model_cls": {"file": MODEL_CLS_FILE, "name": MODEL_CLS_NAME},
            "parallel": parallel_record(spec.num_layers, opts),
        },
    }


# -- weights ------------------------------------------------------------------------------------------------------

def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def checkpoint_weights(spec: ModelSpec, weights: dict[str, torch.Tensor],
                       layer_configs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """TensorRT-LLM-named tensors of the whole (unsplit) model, global layer indices; no_op sublayers contribute
    nothing (their weights are never read)."""
    out = {"transformer.vocab_embedding.weight": weights["embed"],
           "transformer.ln_f.weight": weights["final_norm"],
           "lm_head.weight": weights.get("lm_head", weights["embed"]).clone()}  # clone: safetensors refuses aliases
    for i, lc in enumerate(layer_configs):
        p = f"transformer.layers.{i}"
        w = {r: weights.get(layer_role(i, r)) for r in ("attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up",
                                                        "down")}
        if lc["attention"]["impl"] == "attention":
            out[f"{p}.input_layernorm.weight"] = w["attn_norm"]
            out[f"{p}.attention.qkv.weight"] = torch.cat([w["q"], w["k"], w["v"]], dim=0)
            out[f"{p}.attention.dense.weight"] = w["o"]
        if lc["ffn"]["impl"] == "mlp":
            out[f"{p}.post_layernorm.weight"] = w["ffn_norm"]
            out[f"{p}.mlp.fc.weight"] = w["gate"]  # HF gate_proj (activated branch) -> TensorRT-LLM fc
            out[f"{p}.mlp.gate.weight"] = w["up"]  # HF up_proj -> TensorRT-LLM gate
            out[f"{p}.mlp.proj.weight"] = w["down"]
    return {k: v.contiguous() for k, v in out.items()}


def checkpoint_names(spec: ModelSpec, layer_configs: list[dict[str, Any]]) -> set[str]:
    """Every global tensor name a checkpoint with these layer_configs holds, no more."""
    names = {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i, lc in enumerate(layer_configs):
        p = f"transformer.layers.{i}"
        if lc["attention"]["impl"] == "attention":
            names |= {f"{p}.input_layernorm.weight", f"{p}.attention.qkv.weight", f"{p}.attention.dense.weight"}
        if lc["ffn"]["impl"] == "mlp":
            names |= {f"{p}.post_layernorm.weight", f"{p}.mlp.fc.weight", f"{p}.mlp.gate.weight",
                      f"{p}.mlp.proj.weight"}
    return names


def model_cls_source() -> Path:
    return Path(__file__).with_name("model_class.py")


def write_checkpoint(out_dir: Path, spec: ModelSpec, weights: dict[str, torch.Tensor], plan: SkipPlan,
                     fingerprint: str, options: TrtllmOptions | None = None) -> dict[str, Any]:
    """Write config.json, one rank{N}.safetensors per rank of `options`' mapping and the model class file into
    `out_dir` (an existing, empty folder: the caller makes it atomic). Returns build info for the manifest."""
    from safetensors.torch import save_file

    opts = options or TrtllmOptions()
    check_supported(spec, weights)
    opts.validate(spec)
    plan.check_model(fingerprint, spec.num_layers)
    if getattr(plan, "compensation", None) is not None:  # per-channel h' = a * h + b: the class applies scalars only
        raise InputError("--backend trtllm-checkpoint carries scalar skip scales only; this plan has per-channel "
                         "compensation, which the TensorRT-LLM model class does not apply yet")
    config = build_config(spec, plan, fingerprint, _DTYPES[weights["embed"].dtype], opts)
    full = checkpoint_weights(spec, weights, config["layer_configs"])
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2))
    ranks: list[RankMapping] = opts.ranks(spec.num_layers)
    counts = []
    for rank in ranks:  # one rank in memory at a time (its parts are mostly views of the full tensors)
        tensors = rank_tensors(full, spec, opts, rank)
        save_file(tensors, str(out_dir / rank_file(rank.rank)),
                  metadata={"format": "pt", "adaskip_fingerprint": fingerprint, "rank": str(rank.rank)})
        counts.append(len(tensors))
    shutil.copyfile(model_cls_source(), out_dir / MODEL_CLS_FILE)
    layers = config["adaskip"]["layers"]
    return {
        "config": CONFIG, "weights": [rank_file(r.rank) for r in ranks], "model_cls_file": MODEL_CLS_FILE,
        "model_cls_name": MODEL_CLS_NAME, "mapping": config["mapping"], "options": opts.record(),
        "no_op": {"attention": [i for i, lc in enumerate(config["layer_configs"]) if lc["attention"]["impl"] == "no_op"],
                  "ffn": [i for i, lc in enumerate(config["layer_configs"]) if lc["ffn"]["impl"] == "no_op"]},
        "conditionals": sum(layer[k]["role"] == "dynamic" for layer in layers for k in ("attention", "ffn")),
        "engine_io": config["adaskip"]["engine_io"] is not None,
        "tensors": counts,
    }


def validate_config(config: Any, where: str = "config.json") -> None:
    """The schema, plus the cross-field rules a schema cannot say."""
    try:
        jsonschema.validate(config, CONFIG_SCHEMA)
    except jsonschema.ValidationError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise EngineDirError(f"{where}: not an adaskip TensorRT-LLM checkpoint config at {path}: {e.message}") from None
    n = config["num_hidden_layers"]
    for name, entries in (("layer_configs", config["layer_configs"]), ("adaskip.layers", config["adaskip"]["layers"])):
        if len(entries) != n:
            raise EngineDirError(f"{where}: {name} has {len(entries)} entries for {n} layers")
    for i, (lc, al) in enumerate(zip(config["layer_configs"], config["adaskip"]["layers"])):
        for kind, impl_on in (("attention", "attention"), ("ffn", "mlp")):
            no_op = lc[kind]["impl"] == "no_op"
            if no_op != (al[kind]["role"] == "never") or lc[kind]["impl"] not in ("no_op", impl_on):
                raise EngineDirError(f"{where}: layer {i} {kind}: layer_configs says {lc[kind]['impl']!r} but the "
                                     f"adaskip role is {al[kind]['role']!r}")
            if al[kind]["sublayer"] != 2 * i + (kind == "ffn"):
                raise EngineDirError(f"{where}: layer {i} {kind} names sublayer {al[kind]['sublayer']}")
    m = config["mapping"]
    if m["world_size"] != m["tp_size"] * m["pp_size"]:
        raise EngineDirError(f"{where}: mapping world_size {m['world_size']} is not tp_size {m['tp_size']} x pp_size "
                             f"{m['pp_size']}")


def trtllm_build_command(checkpoint_dir: str | Path, output_dir: str = "trt_engine", world_size: int = 1) -> str:
    """The command line a user runs on a machine with TensorRT-LLM (packed input and the paged KV cache are
    trtllm-build's defaults; the model class refuses a build without them when the plan has conditionals).
    With several ranks, --workers builds them in parallel (one engine per rank, run with mpirun -n N)."""
    d = str(checkpoint_dir)
    workers = f" --workers {world_size}" if world_size > 1 else ""
    return (f"trtllm-build --checkpoint_dir {d} --model_cls_file {d}/{MODEL_CLS_FILE} "
            f"--model_cls_name {MODEL_CLS_NAME} --output_dir {output_dir}{workers}")
