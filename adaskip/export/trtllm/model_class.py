"""AdaSkip model class for TensorRT-LLM's builder (copied next to the checkpoint by adaskip-build):

    trtllm-build --checkpoint_dir CKPT --model_cls_file CKPT/adaskip_trtllm_model.py \
                 --model_cls_name AdaSkipLlamaForCausalLM --output_dir ENGINE

trtllm-build loads this file on its own (importlib SourceFileLoader under the module name "models"), so it imports
only TensorRT and TensorRT-LLM, never adaskip, and reads everything it needs from the checkpoint's config.json.

What it builds on: TensorRT-LLM's NAS model (tensorrt_llm/models/nemotron_nas), which already has per-layer
attention/FFN implementations, `no_op` sublayers without weights, and a KV cache only for layers whose attention is
real. AdaSkip adds, per sublayer j (role from config["adaskip"]["layers"]):

  never    skipped in every forward: h' = scale_j * h, no weights, no KV cache (the `no_op` of layer_configs; DeciLM's
           own no_op would be h' = h, which is only right for scale 1.0)
  always   runs in every forward: h' = h + f_j(Norm(h)), as in TensorRT-LLM's Llama
  dynamic  decided per token at run time (online FFNs of modes decode/e2e, the offline set of mode decode):
           Conditional(all tokens skip j) ? scale * h : where(skip, scale * h, h + f_j(Norm(h)))
           with TensorRT-LLM's `Conditional` (TensorRT's IIfConditional), the branch built from add_input tensors so
           the skipped branch really is not executed; the FFN's IO similarity and norm ratio come from the
           IOSimilarity plugin (the one adaskip's TensorRT builder registers) and leave the engine as outputs.

Several ranks (config["mapping"]; the split rules are TensorRT-LLM's, so DeciLM's own loader reads each rank file):
  * tensor parallelism: every rank of a TP group must take the same branch of every Conditional, because the
    branch that runs the sublayer holds the row-parallel all-reduce (attention.dense, mlp.proj); a rank that
    skipped while another ran would leave that all-reduce waiting forever. The residual stream is replicated, but
    each rank's runtime feeds its own adaskip_skip / adaskip_scale, computed from its own statistics, and
    floating-point differences between ranks could flip a similarity across beta. So before any layer the model
    replaces both inputs by TP rank 0's values (from_first_tp_rank: an all-reduce of rank 0's tensor and exact
    zeros from the others; v + 0 + ... + 0 == v bit for bit in any reduction order), and every predicate is then
    computed from identical values. The all-reduce is unconditional, once per forward, outside every Conditional.
  * pipeline parallelism: a stage builds its own layers only; it reads the adaskip_skip columns of those layers
    and reports their statistics (NaN in the other stages' columns), so the decision for layer i is made for the
    stage that owns it (SkipPolicy's online rule is per FFN, so deciding per stage is the same rule).
  * use_parallel_embedding: DeciLM's model builds a replicated embedding; the class swaps in TensorRT-LLM's
    Embedding with the checkpoint's tp split (embedding_sharding_dim 0 = vocab, 1 = hidden).

Only an engine with some dynamic sublayer has the extra I/O (config["adaskip"]["engine_io"]): inputs
`adaskip_skip` [num_tokens, 2L] bool and `adaskip_scale` [num_tokens, 2L] float32 (each token carries its request's
SkipPolicy mask; in a generation step that is one token per request), outputs `adaskip_similarity` and
`adaskip_norm_ratio` [num_tokens, 2L] (NaN where a sublayer did not run). A plan without dynamic sublayers
(prefill/e2e modes without online learning) gives a plain engine that any TensorRT-LLM runtime serves.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import tensorrt as trt

import tensorrt_llm.functional as F
from tensorrt_llm._common import default_net, default_trtnet
from tensorrt_llm.layers.embedding import Embedding
from tensorrt_llm.models.modeling_utils import PretrainedConfig
from tensorrt_llm.models.nemotron_nas.config import DeciConfig
from tensorrt_llm.models.nemotron_nas.model import (DeciLMDecoderLayer, DeciLMDecoderLayerList, DeciLMForCausalLM,
                                                    DeciLMLayerOutput)

PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE = "IOSimilarity", "1", ""
PLUGIN_LIB_ENV = "ADASKIP_TRT_PLUGIN_LIB"  # path of the C++ plugin library, when not registered from Python

# PretrainedConfig fields carried over into the DeciConfig the NAS model needs (trtllm-build hands us the config
# class of config["architecture"], i.e. LLaMAConfig, whose Llama-only fields the NAS model does not read).
_DECI_KEYS = ("dtype", "logits_dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_size", "intermediate_size", "max_position_embeddings", "hidden_act",
              "norm_epsilon", "position_embedding_type", "rotary_base", "rotary_scaling", "mapping", "quantization",
              "use_parallel_embedding", "embedding_sharding_dim", "layer_configs", "adaskip", "tie_word_embeddings",
              "runtime_defaults")


def to_deci_config(config: PretrainedConfig) -> DeciConfig:
    if isinstance(config, DeciConfig):
        return config
    adaskip = getattr(config, "adaskip", None)
    if not isinstance(adaskip, dict) or adaskip.get("format") != "adaskip.trtllm-checkpoint":
        raise ValueError("this model class builds adaskip TensorRT-LLM checkpoints only (config.json has no "
                         "'adaskip' section); write one with adaskip-build --backend trtllm-checkpoint")
    parallel = adaskip.get("parallel", {})
    mapping = config.mapping
    if (mapping.tp_size, mapping.pp_size) != (parallel.get("tp_size"), parallel.get("pp_size")):
        raise ValueError(f"config mapping tp {mapping.tp_size} x pp {mapping.pp_size} is not the one the checkpoint "
                         f"was written for ({parallel.get('tp_size')} x {parallel.get('pp_size')})")
    d = config.to_dict()
    deci = DeciConfig(architecture="DeciLMForCausalLM", **{k: d[k] for k in _DECI_KEYS if k in d})
    deci.set_rank(config.mapping.rank)
    return deci


# -- the IOSimilarity plugin --------------------------------------------------------------------------------------

def _similarity_creator():
    registry = trt.get_plugin_registry()
    creator = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if creator is None and os.environ.get(PLUGIN_LIB_ENV):
        registry.load_library(os.environ[PLUGIN_LIB_ENV])
        creator = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if creator is None:
        try:  # adaskip's Python IPluginV3, when adaskip is installed in the build environment
            from adaskip.runtime.trt.lib import load_tensorrt  # noqa: PLC0415
            from adaskip.runtime.trt.plugin import register_plugin  # noqa: PLC0415

            register_plugin(load_tensorrt())  # the `tensorrt` module trtllm-build imported, when installed
        except (ImportError, AttributeError):
            pass
        creator = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if creator is None:
        raise RuntimeError(f"TensorRT plugin {PLUGIN_NAME} v{PLUGIN_VERSION} is not registered: set {PLUGIN_LIB_ENV} "
                           f"to adaskip's plugin library or install adaskip in this environment")
    return creator


def _nan_column(x: F.Tensor) -> F.Tensor:
    """[rows of x, 1] float32 NaN: the statistic of a sublayer that did not run."""
    nan = F.constant(np.full((1, 1), np.nan, dtype=np.float32))
    return F.expand(nan, F.concat([F.shape(x, 0), 1]))


def _io_similarity(h_in: F.Tensor, h_out: F.Tensor, hidden: int) -> tuple[F.Tensor, F.Tensor]:
    """Per token (a request's one token in a generation step): cos(h, h') and ||h'|| / ||h||, each [N, 1].
    The plugin takes [B, T, D] and valid [B, T]; packed tokens are B = N rows of T = 1."""
    x = F.view(F.cast(h_in, "float32"), [-1, 1, hidden])
    y = F.view(F.cast(h_out, "float32"), [-1, 1, hidden])
    valid = F.expand(F.constant(np.ones((1, 1), dtype=np.float32)), F.concat([F.shape(h_in, 0), 1]))
    plugin = _similarity_creator().create_plugin(PLUGIN_NAME, trt.PluginFieldCollection([]),
                                                 trt.TensorRTPhase.BUILD)
    layer = default_trtnet().add_plugin_v3([x.trt_tensor, y.trt_tensor, valid.trt_tensor], [], plugin)
    return F._create_tensor(layer.get_output(0), layer), F._create_tensor(layer.get_output(1), layer)


def from_first_tp_rank(x: F.Tensor, tp_rank: int, tp_group: list[int]) -> F.Tensor:
    """TP rank 0's x on every rank of the group, bit for bit (float32): rank 0 contributes x, every other rank
    exact zeros, and the sum all-reduce adds them; v + 0 == v exactly, whatever order the reduction takes, so no
    rank can see another value. Called unconditionally (every rank reaches it), never inside a Conditional."""
    if len(tp_group) == 1:
        return x
    own = x if tp_rank == 0 else F.expand(F.constant(np.zeros((1, 1), dtype=np.float32)),
                                           F.concat([F.shape(x, 0), F.shape(x, 1)]))
    return F.allreduce(own, tp_group)


class _AdaSkipIO:
    """The per-forward skip/scale inputs (TP rank 0's on every rank) and the statistics columns the layers fill in."""

    def __init__(self, skip: F.Tensor, scale: F.Tensor, num_sublayers: int, tp_rank: int = 0,
                 tp_group: list[int] | None = None):
        group = tp_group or [0]
        # every Conditional's predicate and every where() below reads these: identical on every rank of the group
        self.skip = from_first_tp_rank(F.cast(skip, "float32"), tp_rank, group)  # compared against 0.5
        self.scale = from_first_tp_rank(F.cast(scale, "float32"), tp_rank, group)
        self.sims: list = [None] * num_sublayers
        self.ratios: list = [None] * num_sublayers

    def statistics(self) -> tuple[F.Tensor, F.Tensor]:
        """[N, 2L] each; NaN in the columns of layers another pipeline stage owns (it reports them)."""
        nan = _nan_column(self.skip)
        return (F.concat([s if s is not None else nan for s in self.sims], dim=1),
                F.concat([r if r is not None else nan for r in self.ratios], dim=1))

    def column(self, t: F.Tensor, j: int) -> F.Tensor:
        return F.index_select(t, 1, F.constant(np.array([j], dtype=np.int32)))  # [N, 1]


class AdaSkipDecoderLayer(DeciLMDecoderLayer):
    def __init__(self, config: DeciConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        entry = config.adaskip["layers"][layer_idx]
        self.adaskip_attention, self.adaskip_ffn = entry["attention"], entry["ffn"]
        self.adaskip_io = None  # set by the model before each forward

    def forward(self, hidden_states, attention_mask=None, use_cache=False, spec_decoding_params=None,
                kv_cache_params=None, attention_params=None, lora_layer_params=None, **unused):
        def attention(x):
            out = self.attention(hidden_states=self.input_layernorm(x), attention_mask=attention_mask,
                                 use_cache=use_cache, spec_decoding_params=spec_decoding_params,
                                 kv_cache_params=kv_cache_params, attention_params=attention_params,
                                 lora_layer_params=lora_layer_params)
            return out if use_cache else (out, None)

        def ffn(x):
            return self.ffn(self.post_layernorm(x), lora_layer_params=lora_layer_params), None

        h, present = self._sublayer(hidden_states, self.adaskip_attention, attention)
        h, _ = self._sublayer(h, self.adaskip_ffn, ffn)
        return DeciLMLayerOutput(hidden_states=h, present_kv=present)

    def _record(self, j: int, sim, ratio) -> None:
        if self.adaskip_io is not None:
            self.adaskip_io.sims[j], self.adaskip_io.ratios[j] = sim, ratio

    def _sublayer(self, h, entry: dict, block):
        j, role, scale = entry["sublayer"], entry["role"], float(entry["scale"])
        if role == "never":
            if self.adaskip_io is not None:
                self._record(j, _nan_column(h), _nan_column(h))
            return (h if scale == 1.0 else h * scale), None
        if role == "always":
            delta, present = block(h)
            if self.adaskip_io is not None:
                self._record(j, _nan_column(h), _nan_column(h))
            return h + delta, present
        return self._dynamic(h, j, block)

    def _dynamic(self, h, j: int, block):
        io = self.adaskip_io
        if io is None:
            raise ValueError(f"sublayer {j} is decided at run time but the engine has no adaskip inputs")
        skip = io.column(io.skip, j)  # [N, 1], 1.0 = this token's request skips j
        scale = F.cast(io.column(io.scale, j), h.dtype)
        all_skip = F.max(1.0 - skip, dim=0) < 0.5  # no token runs j: take the cheap branch
        cond = F.Conditional(all_skip)
        h_, skip_, scale_ = cond.add_input(h), cond.add_input(skip), cond.add_input(scale)
        # then: every token skips
        skipped = h_ * scale_
        # else: run the sublayer; tokens whose request skips j still get scale * h
        delta, _present = block(h_)  # a paged KV cache is written in place; nothing leaves the branch
        full = h_ + delta
        mixed = F.where(skip_ > 0.5, h_ * scale_, full)
        sim, ratio = _io_similarity(h_, full, self.config.hidden_size)
        sim = F.where(skip_ > 0.5, _nan_column(h_), sim)
        ratio = F.where(skip_ > 0.5, _nan_column(h_), ratio)
        out = cond.add_output(skipped, mixed)
        self._record(j, cond.add_output(_nan_column(h_), sim), cond.add_output(_nan_column(h_), ratio))
        return out, None


class AdaSkipLlamaForCausalLM(DeciLMForCausalLM):
    config_class = DeciConfig

    def __init__(self, config: PretrainedConfig):
        config = to_deci_config(config)
        super().__init__(config)
        self.transformer.layers = DeciLMDecoderLayerList(AdaSkipDecoderLayer, config)
        mapping = config.mapping
        if config.use_parallel_embedding and mapping.is_first_pp_rank():  # DeciLM's own embedding is replicated
            self.transformer.vocab_embedding = Embedding(
                config.vocab_size, config.hidden_size, dtype=config.dtype, tp_size=mapping.tp_size,
                tp_group=mapping.tp_group, sharding_dim=config.embedding_sharding_dim, tp_rank=mapping.tp_rank)
        self.adaskip_num_sublayers = 2 * config.num_hidden_layers
        self.adaskip_engine_io = config.adaskip.get("engine_io") is not None
        self.adaskip_dynamic_attention = any(layer["attention"]["role"] == "dynamic"
                                             for layer in config.adaskip["layers"])

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str, rank: int | None = None, config: PretrainedConfig | None = None):
        if config is None:
            config = PretrainedConfig.from_json_file(os.path.join(ckpt_dir, "config.json"))
        if rank is not None:
            config.set_rank(rank)
        # DeciLM's loader renames `.mlp.` to `.ffn.` (its module name) and reads rank{N}.safetensors.
        return super().from_checkpoint(ckpt_dir, rank, to_deci_config(config))

    def _check_build_options(self) -> None:
        plugins = default_net().plugin_config
        if plugins.reduce_fusion:
            raise ValueError("adaskip's model class does not support reduce_fusion (its layers add the residual "
                             "around each sublayer themselves)")
        if self.adaskip_engine_io and not plugins.remove_input_padding:
            raise ValueError("adaskip's run-time skipping needs packed input (remove_input_padding enabled, "
                             "trtllm-build's default)")
        if self.adaskip_dynamic_attention and not plugins.paged_kv_cache:
            raise ValueError("conditional attention needs the paged KV cache (--kv_cache_type paged, the default)")

    def prepare_inputs(self, *args, **kwargs):
        inputs = super().prepare_inputs(*args, **kwargs)
        self._check_build_options()
        if not self.adaskip_engine_io:
            return inputs
        n = self.adaskip_num_sublayers
        profiles = inputs["input_ids"].profiles  # the token-count ranges of every optimization profile
        dims = OrderedDict([("num_tokens", [[p.min[0], p.opt[0], p.max[0]] for p in profiles]),
                            ("adaskip_sublayers", [n] * len(profiles))])
        inputs["adaskip_skip"] = F.Tensor(name="adaskip_skip", dtype=trt.bool, shape=[-1, n], dim_range=dims)
        inputs["adaskip_scale"] = F.Tensor(name="adaskip_scale", dtype=trt.float32, shape=[-1, n],
                                           dim_range=OrderedDict(dims))
        return inputs

    def forward(self, input_ids, position_ids=None, use_cache=False, last_token_ids=None, attention_mask=None,
                kv_cache_params=None, attention_params=None, hidden_states=None, prompt_embedding_table=None,
                prompt_tasks=None, prompt_vocab_size=None, lora_params=None, spec_decoding_params=None,
                adaskip_skip=None, adaskip_scale=None):
        io = None
        if self.adaskip_engine_io:
            if adaskip_skip is None or adaskip_scale is None:
                raise ValueError("this plan decides sublayers at run time: adaskip_skip and adaskip_scale are inputs")
            mapping = self.config.mapping
            io = _AdaSkipIO(adaskip_skip, adaskip_scale, self.adaskip_num_sublayers, mapping.tp_rank,
                            mapping.tp_group)
        for layer in self.transformer.layers:
            layer.adaskip_io = io
        out = super().forward(input_ids, position_ids=position_ids, use_cache=use_cache,
                              last_token_ids=last_token_ids, attention_mask=attention_mask,
                              kv_cache_params=kv_cache_params, attention_params=attention_params,
                              hidden_states=hidden_states, prompt_embedding_table=prompt_embedding_table,
                              prompt_tasks=prompt_tasks, prompt_vocab_size=prompt_vocab_size,
                              lora_params=lora_params, spec_decoding_params=spec_decoding_params)
        if io is not None:
            sims, ratios = io.statistics()
            sims.mark_output("adaskip_similarity", "float32")
            ratios.mark_output("adaskip_norm_ratio", "float32")
        return out
