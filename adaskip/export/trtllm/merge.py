"""Reading a TensorRT-LLM checkpoint back: merge every rank's file into the whole model (the inverse of
TensorRT-LLM's split rules, parallel.py) in adaskip's terms (ModelSpec, role-named weights, plan), so that the
reference engine can run it. This is how a checkpoint that cannot be built here is verified: same logits as the
source model under the same plan, for every tensor- and pipeline-parallel mapping."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaskip.errors import EngineDirError, InputError, PlanError
from adaskip.export.trtllm.checkpoint import (CONFIG, checkpoint_names, parallel_record, rank_file, sublayer_layout,
                                              validate_config)
from adaskip.export.trtllm.parallel import RankMapping, TrtllmOptions, merge_ranks
from adaskip.model.spec import ModelSpec, layer_role
from adaskip.plan import SkipPlan


@dataclass
class TrtllmCheckpoint:
    spec: ModelSpec
    weights: dict[str, torch.Tensor]  # role-named, merged across ranks; skipped (no_op) sublayers have none
    plan: SkipPlan
    fingerprint: str  # the source model's fingerprint (the plan's); the partial weights cannot be re-hashed to it
    config: dict[str, Any]
    options: TrtllmOptions  # the mapping the ranks were written for


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


def _role_weights(spec: ModelSpec, tensors: dict[str, torch.Tensor], layer_configs: list[dict[str, Any]],
                  where: str) -> dict[str, torch.Tensor]:
    """Global TensorRT-LLM names -> adaskip roles (q, k, v out of the fused qkv; fc/gate back to gate/up)."""
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
            w[layer_role(i, "q")], w[layer_role(i, "k")], w[layer_role(i, "v")] = (
                t.contiguous() for t in torch.split(tensors[f"{p}.attention.qkv.weight"], [q, kv, kv], dim=0))
            w[layer_role(i, "attn_norm")] = tensors[f"{p}.input_layernorm.weight"]
            w[layer_role(i, "o")] = tensors[f"{p}.attention.dense.weight"]
        if lc["ffn"]["impl"] == "mlp":
            w[layer_role(i, "ffn_norm")] = tensors[f"{p}.post_layernorm.weight"]
            w[layer_role(i, "gate")] = tensors[f"{p}.mlp.fc.weight"]
            w[layer_role(i, "up")] = tensors[f"{p}.mlp.gate.weight"]
            w[layer_role(i, "down")] = tensors[f"{p}.mlp.proj.weight"]
    return w


def read_config(root: Path) -> dict[str, Any]:
    try:
        config = json.loads((root / CONFIG).read_text())
    except FileNotFoundError:
        raise EngineDirError(f"{root}: no {CONFIG}: not a TensorRT-LLM checkpoint") from None
    except (OSError, json.JSONDecodeError) as e:
        raise EngineDirError(f"{root / CONFIG} is unreadable: {e}") from None
    validate_config(config, str(root / CONFIG))
    return config


def read_checkpoint(path: str | Path) -> TrtllmCheckpoint:
    """Load a checkpoint written by `write_checkpoint`, merging its ranks, back into adaskip's terms."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    config = read_config(root)
    where = str(root / CONFIG)
    try:
        plan = SkipPlan.from_dict(config["adaskip"]["plan"])
    except PlanError as e:
        raise EngineDirError(f"{where}: adaskip.plan: {e}") from None
    if plan.digest() != config["adaskip"]["plan_digest"]:
        raise EngineDirError(f"{where}: adaskip.plan does not match its digest (edited by hand?)")
    spec = _spec_from_config(config)
    fp = config["adaskip"]["model"]["fingerprint"]
    try:
        plan.check_model(fp, spec.num_layers)
    except PlanError as e:
        raise EngineDirError(f"{where}: {e}") from None
    layer_configs, layers = sublayer_layout(spec, plan)
    if layer_configs != config["layer_configs"] or layers != config["adaskip"]["layers"]:
        raise EngineDirError(f"{where}: layer_configs / adaskip.layers are not what the plan implies")
    opts = TrtllmOptions.from_config(config)
    try:
        opts.validate(spec)
    except InputError as e:  # a mapping this model cannot have
        raise EngineDirError(f"{where}: mapping: {e}") from None
    if config["adaskip"]["parallel"] != json.loads(json.dumps(parallel_record(spec.num_layers, opts))):
        raise EngineDirError(f"{where}: adaskip.parallel is not what the mapping implies")
    present = sorted(p.name for p in root.glob("rank*.safetensors"))
    expected_files = [rank_file(r) for r in range(opts.world_size)]
    if sorted(present) != sorted(expected_files):
        raise EngineDirError(f"{root}: the mapping (tp {opts.tp_size} x pp {opts.pp_size}) needs "
                             f"{', '.join(expected_files)}; found {', '.join(present) or 'none'}")

    def load(rank: RankMapping) -> dict[str, torch.Tensor]:
        f = root / rank_file(rank.rank)
        try:
            return load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise EngineDirError(f"{f} is corrupt: {e}") from None

    tensors = merge_ranks(load, checkpoint_names(spec, layer_configs), spec, opts, str(root))
    dtype = str(tensors["transformer.ln_f.weight"].dtype).removeprefix("torch.")
    if dtype != config["dtype"]:
        raise EngineDirError(f"{root}: the rank files hold {dtype} tensors but config.json says {config['dtype']}")
    weights = _role_weights(spec, tensors, layer_configs, str(root))
    return TrtllmCheckpoint(spec=spec, weights=weights, plan=plan, fingerprint=fp, config=config, options=opts)
