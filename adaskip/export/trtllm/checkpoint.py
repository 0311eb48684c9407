"""TensorRT-LLM checkpoint (config.json + rank0.safetensors) for the Llama family, carrying the skip plan.

Layout (TensorRT-LLM's docs/source/architecture/checkpoint.md): a folder with `config.json` and one
`rank{N}.safetensors` per rank; we write a single rank (mapping tp = pp = 1). Weight names follow TensorRT-LLM's
Llama converter (tensorrt_llm/models/llama/convert.py):

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import torch

from adaskip.errors import EngineDirError, InputError, PlanError
from adaskip.model.spec import ModelSpec, layer_role
from adaskip.layout import SkipLayout
from adaskip.plan import SkipPlan

CONFIG = "config.json"
WEIGHTS = "rank0.safetensors"
MODEL_CLS_FILE = "adaskip_trtllm_model.py"  # the model class trtllm-build loads with --model_cls_file
MODEL_CLS_NAME = "AdaSkipLlamaForCausalLM"
EXTENSION_FORMAT = "adaskip.trtllm-checkpoint"
EXTENSION_VERSION = 1
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
                    "properties": {k: {"const": 1} for k in ("world_size", "tp_size", "pp_size")}},
        "quantization": {"type": "object", "required": ["quant_algo"], "properties": {"quant_algo": {"const": None}}},
        "layer_configs": {"type": "array", "items": {
            "type": "object", "required": ["attention", "ffn"], "additionalProperties": False,
            "properties": {"attention": _IMPL_ATTN, "ffn": _IMPL_FFN}}},
        "adaskip": {"type": "object", "required": ["format", "version", "layers", "online", "engine_io", "plan",
                                                    "plan_digest", "model", "model_cls"],
                    "properties": {
                        "format": {"const": EXTENSION_FORMAT}, "version": {"const": EXTENSION_VERSION},
                        "layers": {"type": "array", "items": {
                            "type": "object", "required": ["attention", "ffn"], "additionalProperties": False,
                            "properties": {"attention": _SUBLAYER, "ffn": _SUBLAYER}}},
                        "online": {"type": "object", "required": ["enabled", "window", "beta", "ffn_sublayers"]},
                        "engine_io": {"type": ["object", "null"]},
                        "plan": {"type": "object"},
                        "model": {"type": "object", "required": ["fingerprint", "spec"]},
                        "model_cls": {"type": "object", "required": ["file", "name"]}}},
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
                 "so row t of the outputs is request t's decode statistics; NaN where a sublayer did not run",
    }


def build_config(spec: ModelSpec, plan: SkipPlan, fingerprint: str, dtype: str) -> dict[str, Any]:
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
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
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
        },
    }


# -- weights ------------------------------------------------------------------------------------------------------

def checkpoint_weights(spec: ModelSpec, weights: dict[str, torch.Tensor],
                       layer_configs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """TensorRT-LLM-named tensors; no_op sublayers contribute nothing (their weights are never read)."""
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


def model_cls_source() -> Path:
    return Path(__file__).with_name("model_class.py")


def write_checkpoint(out_dir: Path, spec: ModelSpec, weights: dict[str, torch.Tensor], plan: SkipPlan,
                     fingerprint: str) -> dict[str, Any]:
    """Write config.json, rank0.safetensors and the model class file into `out_dir` (an existing, empty folder:
    the caller makes it atomic). Returns build info for the manifest."""
    from safetensors.torch import save_file

    check_supported(spec, weights)
    plan.check_model(fingerprint, spec.num_layers)
    if getattr(plan, "compensation", None) is not None:  # per-channel h' = a * h + b: the class applies scalars only
        raise InputError("--backend trtllm-checkpoint carries scalar skip scales only; this plan has per-channel "
                         "compensation, which the TensorRT-LLM model class does not apply yet")
    config = build_config(spec, plan, fingerprint, _DTYPES[weights["embed"].dtype])
    tensors = checkpoint_weights(spec, weights, config["layer_configs"])
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt", "adaskip_fingerprint": fingerprint})
    shutil.copyfile(model_cls_source(), out_dir / MODEL_CLS_FILE)
    layers = config["adaskip"]["layers"]
    return {
        "config": CONFIG, "weights": WEIGHTS, "model_cls_file": MODEL_CLS_FILE, "model_cls_name": MODEL_CLS_NAME,
        "no_op": {"attention": [i for i, lc in enumerate(config["layer_configs"]) if lc["attention"]["impl"] == "no_op"],
                  "ffn": [i for i, lc in enumerate(config["layer_configs"]) if lc["ffn"]["impl"] == "no_op"]},
        "conditionals": sum(layer[k]["role"] == "dynamic" for layer in layers for k in ("attention", "ffn")),
        "engine_io": config["adaskip"]["engine_io"] is not None,
        "tensors": len(tensors),
    }


# -- reading it back (round trip into the reference engine) -------------------------------------------------------

@dataclass
class TrtllmCheckpoint:
    spec: ModelSpec
    weights: dict[str, torch.Tensor]  # role-named; skipped (no_op) sublayers have none
    plan: SkipPlan
    fingerprint: str  # the source model's fingerprint (the plan's); the partial weights cannot be re-hashed to it
    config: dict[str, Any]


def validate_config(config: Any, where: str = "config.json") -> None:
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


def _spec_from_config(config: dict[str, Any]) -> ModelSpec:
    """Rebuild the ModelSpec from the TensorRT-LLM fields (what trtllm-build reads), then check it against the
    spec the exporter recorded, so a config edited by hand cannot silently disagree with its own record."""
    recorded = ModelSpec.from_dict(config["adaskip"]["model"]["spec"])
    rs = config["rotary_scaling"]
    scaling = None
    if rs is not None:
        scaling = {"type": rs.get("type", rs.get("rope_type")), "factor": float(rs["factor"])}
        if scaling["type"] == "llama3":
            scaling.update(low_freq_factor=float(rs["low_freq_factor"]), high_freq_factor=float(rs["high_freq_factor"]),
                           original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
    spec = ModelSpec(
        family=recorded.family, num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"],
        head_dim=config["head_size"], intermediate_size=config["intermediate_size"], vocab_size=config["vocab_size"],
        max_position_embeddings=config["max_position_embeddings"], rope_theta=float(config["rotary_base"]),
        norm_eps=float(config["norm_epsilon"]), rope_scaling=scaling,
        tie_word_embeddings=bool(config["tie_word_embeddings"]), activation="silu", name=recorded.name)
    if spec != recorded:
        raise EngineDirError("config.json: the TensorRT-LLM fields disagree with the model spec adaskip recorded "
                             "(edited by hand?)")
    return spec


def _weights_from_tensors(spec: ModelSpec, tensors: dict[str, torch.Tensor],
                          layer_configs: list[dict[str, Any]], where: str) -> dict[str, torch.Tensor]:
    expected = checkpoint_names(spec, layer_configs)
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise EngineDirError(f"{where}: tensors do not match config.json's layer_configs (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    w = {"embed": tensors["transformer.vocab_embedding.weight"], "final_norm": tensors["transformer.ln_f.weight"]}
    lm_head = tensors["lm_head.weight"]
    if spec.tie_word_embeddings:
        if not torch.equal(lm_head, w["embed"]):
            raise EngineDirError(f"{where}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
    else:
        w["lm_head"] = lm_head
    for i, lc in enumerate(layer_configs):
        p = f"transformer.layers.{i}"
        if lc["attention"]["impl"] == "attention":
            qkv = tensors[f"{p}.attention.qkv.weight"]
            if qkv.shape[0] != q + 2 * kv:
                raise EngineDirError(f"{where}: {p}.attention.qkv.weight has {qkv.shape[0]} rows, expected {q + 2 * kv}")
            w[layer_role(i, "q")], w[layer_role(i, "k")], w[layer_role(i, "v")] = (
                t.contiguous() for t in torch.split(qkv, [q, kv, kv], dim=0))
            w[layer_role(i, "attn_norm")] = tensors[f"{p}.input_layernorm.weight"]
            w[layer_role(i, "o")] = tensors[f"{p}.attention.dense.weight"]
        if lc["ffn"]["impl"] == "mlp":
            w[layer_role(i, "ffn_norm")] = tensors[f"{p}.post_layernorm.weight"]
            w[layer_role(i, "gate")] = tensors[f"{p}.mlp.fc.weight"]
            w[layer_role(i, "up")] = tensors[f"{p}.mlp.gate.weight"]
            w[layer_role(i, "down")] = tensors[f"{p}.mlp.proj.weight"]
    return w


def checkpoint_names(spec: ModelSpec, layer_configs: list[dict[str, Any]]) -> set[str]:
    """Every tensor name a checkpoint with these layer_configs holds, no more."""
    names = {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i, lc in enumerate(layer_configs):
        p = f"transformer.layers.{i}"
        if lc["attention"]["impl"] == "attention":
            names |= {f"{p}.input_layernorm.weight", f"{p}.attention.qkv.weight", f"{p}.attention.dense.weight"}
        if lc["ffn"]["impl"] == "mlp":
            names |= {f"{p}.post_layernorm.weight", f"{p}.mlp.fc.weight", f"{p}.mlp.gate.weight",
                      f"{p}.mlp.proj.weight"}
    return names


def read_checkpoint(path: str | Path) -> TrtllmCheckpoint:
    """Load a checkpoint written by `write_checkpoint` back into adaskip's terms (ModelSpec, role weights, plan)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    try:
        config = json.loads((root / CONFIG).read_text())
    except FileNotFoundError:
        raise EngineDirError(f"{root}: no {CONFIG}: not a TensorRT-LLM checkpoint") from None
    except (OSError, json.JSONDecodeError) as e:
        raise EngineDirError(f"{root / CONFIG} is unreadable: {e}") from None
    validate_config(config, str(root / CONFIG))
    try:
        plan = SkipPlan.from_dict(config["adaskip"]["plan"])
    except PlanError as e:
        raise EngineDirError(f"{root / CONFIG}: adaskip.plan: {e}") from None
    if plan.digest() != config["adaskip"]["plan_digest"]:
        raise EngineDirError(f"{root / CONFIG}: adaskip.plan does not match its digest (edited by hand?)")
    spec = _spec_from_config(config)
    fp = config["adaskip"]["model"]["fingerprint"]
    try:
        plan.check_model(fp, spec.num_layers)
    except PlanError as e:
        raise EngineDirError(f"{root / CONFIG}: {e}") from None
    layer_configs, layers = sublayer_layout(spec, plan)
    if layer_configs != config["layer_configs"] or layers != config["adaskip"]["layers"]:
        raise EngineDirError(f"{root / CONFIG}: layer_configs / adaskip.layers are not what the plan implies")
    try:
        tensors = load_file(str(root / WEIGHTS))
    except FileNotFoundError:
        raise EngineDirError(f"{root}: no {WEIGHTS}") from None
    except (SafetensorError, OSError) as e:
        raise EngineDirError(f"{root / WEIGHTS} is corrupt: {e}") from None
    weights = _weights_from_tensors(spec, tensors, config["layer_configs"], str(root / WEIGHTS))
    return TrtllmCheckpoint(spec=spec, weights=weights, plan=plan, fingerprint=fp, config=config)


def trtllm_build_command(checkpoint_dir: str | Path, output_dir: str = "trt_engine") -> str:
    """The command line a user runs on a machine with TensorRT-LLM (packed input and the paged KV cache are
    trtllm-build's defaults; the model class refuses a build without them when the plan has conditionals)."""
    d = str(checkpoint_dir)
    return (f"trtllm-build --checkpoint_dir {d} --model_cls_file {d}/{MODEL_CLS_FILE} "
            f"--model_cls_name {MODEL_CLS_NAME} --output_dir {output_dir}")

