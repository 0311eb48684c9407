"""Tensor and pipeline parallelism for the TensorRT-LLM checkpoint: the mapping, TensorRT-LLM's split rules, and
their inverses (merge). One home for each rule: the writer, the reader and the shape checks all call these.

Rules as in TensorRT-LLM's own converters (checked in NVIDIA/TensorRT-LLM: tensorrt_llm/mapping.py @05ebebb2,
models/convert_utils.py @03961722 (split, dup_kv_weight), models/llama/convert.py @0afa06ab and
models/nemotron_nas/convert.py @2a9abd95 (load_model_weights), layers/embedding.py @0f02b7af; version.py there
says 1.0.0rc4):

  * ranks: rank = pp_rank * tp_size + tp_rank (cp_size 1); pipeline stage p holds the layers
    torch.tensor_split(arange(L), pp)[p] (the first L % pp stages get one layer more), named with *local* indices
    transformer.layers.{i - first}; the embedding lives on the first stage, ln_f and lm_head on the last;
  * column-parallel (split the output dim, dim 0): mlp.fc, mlp.gate, and q, k, v each split by heads then
    concatenated per rank [q_r; k_r; v_r]; when there are fewer KV heads than ranks, each KV head is first
    repeated tp / kv times (dup_kv_weight) so that every rank holds one;
  * row-parallel (split the input dim, dim 1): attention.dense, mlp.proj;
  * lm_head: vocab-parallel, rows padded with zeros to a multiple of tp (pad_vocab_size) then split;
  * vocab_embedding: replicated, or with use_parallel_embedding split along embedding_sharding_dim
    (0 = vocab, 1 = hidden);
  * norms: replicated.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from adaskip.errors import EngineDirError, InputError
from adaskip.model.spec import ModelSpec

EMBEDDING_SHARDING = {"vocab": 0, "hidden": 1}  # --parallel-embedding -> TensorRT-LLM's embedding_sharding_dim


@dataclass(frozen=True)
class RankMapping:
    rank: int
    tp_rank: int
    pp_rank: int
    layers: tuple[int, ...]  # global indices of the decoder layers this rank's pipeline stage holds
    first_stage: bool
    last_stage: bool

    def local_name(self, name: str) -> str | None:
        """The name a global tensor has in this rank's file, or None when its stage does not hold it."""
        if name.startswith("transformer.layers."):
            i = int(name.split(".")[2])
            if i not in self.layers:
                return None
            rest = name.split(".", 3)[3]
            return f"transformer.layers.{i - self.layers[0]}.{rest}"
        if name == "transformer.vocab_embedding.weight":
            return name if self.first_stage else None
        return name if self.last_stage else None  # ln_f, lm_head


def pp_layers(num_layers: int, pp_size: int, pp_rank: int) -> tuple[int, ...]:
    """TensorRT-LLM's Mapping.pp_layers: tensor_split of the layers, the first num_layers % pp stages one longer."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return tuple(range(start, start + base + (pp_rank < extra)))


@dataclass(frozen=True)
class TrtllmOptions:
    """adaskip-build's TensorRT-LLM flags: the parallel mapping the checkpoint is written for."""

    tp_size: int = 1
    pp_size: int = 1
    parallel_embedding: str | None = None  # None (replicated), "vocab" or "hidden"

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def embedding_sharding_dim(self) -> int:
        return EMBEDDING_SHARDING.get(self.parallel_embedding or "vocab", 0)

    def given(self) -> list[str]:
        """The flags set away from their defaults (each field is its flag: tp_size -> --tp-size)."""
        return ["--" + f.name.replace("_", "-") for f in fields(self) if getattr(self, f.name) != f.default]

    def record(self) -> dict[str, Any]:
        """As the manifest records them (build.trtllm.options)."""
        return {"tp_size": self.tp_size, "pp_size": self.pp_size, "parallel_embedding": self.parallel_embedding}

    def validate(self, spec: ModelSpec | None = None) -> None:
        """Refuse, before any work, a mapping that TensorRT-LLM could not build (for this model, when given)."""
        for flag, v in (("--tp-size", self.tp_size), ("--pp-size", self.pp_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{flag} must be a positive integer; got {v!r}")
        if self.parallel_embedding not in (None, *EMBEDDING_SHARDING):
            raise InputError(f"--parallel-embedding must be one of {', '.join(EMBEDDING_SHARDING)}; "
                             f"got {self.parallel_embedding!r}")
        if self.parallel_embedding is not None and self.tp_size == 1:
            raise InputError("--parallel-embedding splits the embedding across tensor-parallel ranks; it needs "
                             "--tp-size > 1")
        if spec is None:
            return
        problems = tp_problems(spec, self.tp_size, self.parallel_embedding)
        if problems:
            raise InputError(f"--tp-size {self.tp_size} does not divide this model: {'; '.join(problems)} "
                             f"(tensor-parallel sizes that do: {', '.join(map(str, valid_tp_sizes(spec)))})")
        if self.pp_size > spec.num_layers:
            raise InputError(f"--pp-size {self.pp_size} exceeds the model's {spec.num_layers} layers (each pipeline "
                             f"stage needs at least one)")

    def ranks(self, num_layers: int) -> list[RankMapping]:
        out = []
        for rank in range(self.world_size):
            pp_rank, tp_rank = divmod(rank, self.tp_size)
            out.append(RankMapping(rank=rank, tp_rank=tp_rank, pp_rank=pp_rank,
                                   layers=pp_layers(num_layers, self.pp_size, pp_rank),
                                   first_stage=pp_rank == 0, last_stage=pp_rank == self.pp_size - 1))
        return out

    def config_fields(self) -> dict[str, Any]:
        """The TensorRT-LLM config.json fields this mapping sets."""
        return {"mapping": {"world_size": self.world_size, "tp_size": self.tp_size, "pp_size": self.pp_size},
                "use_parallel_embedding": self.parallel_embedding is not None,
                "embedding_sharding_dim": self.embedding_sharding_dim}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "TrtllmOptions":
        m = config["mapping"]
        embedding = None
        if config.get("use_parallel_embedding"):
            embedding = {v: k for k, v in EMBEDDING_SHARDING.items()}.get(config.get("embedding_sharding_dim"))
            if embedding is None:
                raise EngineDirError(f"config.json: embedding_sharding_dim {config.get('embedding_sharding_dim')!r} "
                                     f"is not 0 or 1")
        return cls(tp_size=m["tp_size"], pp_size=m["pp_size"], parallel_embedding=embedding)


def tp_problems(spec: ModelSpec, tp: int, parallel_embedding: str | None = None) -> list[str]:
    """What keeps `tp` from splitting this model the way TensorRT-LLM does (empty: it divides)."""
    out = []
    if spec.num_heads % tp:
        out.append(f"{spec.num_heads} query heads")
    kv = spec.num_kv_heads
    if kv % tp and tp % kv:  # fewer KV heads than ranks: replicated tp / kv times (needs kv | tp)
        out.append(f"{kv} KV heads (tp must divide them or be a multiple of them)")
    if spec.intermediate_size % tp:
        out.append(f"FFN width {spec.intermediate_size}")
    if parallel_embedding == "vocab" and spec.vocab_size % tp:
        out.append(f"vocabulary {spec.vocab_size} (vocab-sharded embedding)")
    if parallel_embedding == "hidden" and spec.hidden_size % tp:
        out.append(f"hidden size {spec.hidden_size} (hidden-sharded embedding)")
    return out


def valid_tp_sizes(spec: ModelSpec, limit: int = 64) -> list[int]:
    return [tp for tp in range(1, limit + 1) if not tp_problems(spec, tp)]


# -- TensorRT-LLM's split rules and their inverses ----------------------------------------------------------------

def padded_vocab(vocab: int, tp: int) -> int:
    """pad_vocab_size: the lm_head's rows rounded up to a multiple of tp."""
    return -(-vocab // tp) * tp


def _qkv_sizes(spec: ModelSpec) -> tuple[int, int]:
    return spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim


def _dup_kv(w: torch.Tensor, heads: int, tp: int, head_dim: int) -> torch.Tensor:
    """dup_kv_weight: each KV head repeated tp / heads times, so that every rank gets one."""
    if tp <= heads:
        return w
    reps = tp // heads
    return w.reshape(heads, 1, head_dim, -1).expand(heads, reps, head_dim, w.shape[-1]).reshape(heads * reps * head_dim,
                                                                                               -1)


def _shard_qkv(w: torch.Tensor, spec: ModelSpec, tp: int, r: int) -> torch.Tensor:
    q, kv = _qkv_sizes(spec)
    wq, wk, wv = torch.split(w, [q, kv, kv], dim=0)
    wk, wv = (_dup_kv(t, spec.num_kv_heads, tp, spec.head_dim) for t in (wk, wv))
    return torch.cat([torch.chunk(t, tp, dim=0)[r] for t in (wq, wk, wv)], dim=0)


def _merge_qkv(parts: list[torch.Tensor], spec: ModelSpec, tp: int, name: str) -> torch.Tensor:
    q, kv = _qkv_sizes(spec)
    kv_r = max(spec.num_kv_heads // tp, 1) * spec.head_dim
    split = [torch.split(p, [q // tp, kv_r, kv_r], dim=0) for p in parts]
    wq = torch.cat([s[0] for s in split], dim=0)
    ks, vs = [s[1] for s in split], [s[2] for s in split]
    if tp > spec.num_kv_heads:  # replicated heads: every copy must agree; keep one per head
        reps = tp // spec.num_kv_heads
        for copies in (ks, vs):
            for r, t in enumerate(copies):
                if not torch.equal(t, copies[r - r % reps]):
                    raise EngineDirError(f"{name}: the ranks' copies of a replicated KV head differ (rank {r})")
        ks, vs = ks[::reps], vs[::reps]
    return torch.cat([wq, torch.cat(ks, dim=0), torch.cat(vs, dim=0)], dim=0)


def _shard_lm_head(w: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    pad = padded_vocab(w.shape[0], tp) - w.shape[0]
    if pad:
        w = torch.cat([w, w.new_zeros(pad, w.shape[1])], dim=0)
    return torch.chunk(w, tp, dim=0)[r]


def split_rule(name: str, opts: TrtllmOptions) -> str:
    """How a (global) tensor is split across tensor-parallel ranks."""
    if name.endswith(".attention.qkv.weight"):
        return "qkv"
    if name.endswith((".mlp.fc.weight", ".mlp.gate.weight")):
        return "column"
    if name.endswith((".attention.dense.weight", ".mlp.proj.weight")):
        return "row"
    if name == "lm_head.weight":
        return "lm_head"
    if name == "transformer.vocab_embedding.weight" and opts.parallel_embedding is not None:
        return "embedding"
    return "replicated"  # norms, and the embedding without --parallel-embedding


def shard(name: str, w: torch.Tensor, spec: ModelSpec, opts: TrtllmOptions, tp_rank: int) -> torch.Tensor:
    """Rank tp_rank's part of the global tensor `name` (on a meta tensor: the part's shape)."""
    tp, rule = opts.tp_size, split_rule(name, opts)
    if tp == 1 or rule == "replicated":
        return w
    if rule == "qkv":
        return _shard_qkv(w, spec, tp, tp_rank)
    if rule == "lm_head":
        return _shard_lm_head(w, tp, tp_rank)
    dim = {"column": 0, "row": 1, "embedding": opts.embedding_sharding_dim}[rule]
    return torch.chunk(w, tp, dim=dim)[tp_rank]


def merge(name: str, parts: list[torch.Tensor], spec: ModelSpec, opts: TrtllmOptions) -> torch.Tensor:
    """The global tensor from its tensor-parallel parts (tp_rank order): the inverse of `shard`."""
    tp, rule = opts.tp_size, split_rule(name, opts)
    if tp == 1:
        return parts[0]
    if rule == "replicated":
        for r, p in enumerate(parts[1:], 1):
            if not torch.equal(p, parts[0]):
                raise EngineDirError(f"{name} is replicated across tensor-parallel ranks but rank {r}'s copy differs")
        return parts[0]
    if rule == "qkv":
        return _merge_qkv(parts, spec, tp, name)
    if rule == "lm_head":
        w = torch.cat(parts, dim=0)
        if w[spec.vocab_size:].any():
            raise EngineDirError(f"{name}: the vocabulary padding rows are not zero")
        return w[:spec.vocab_size]
    dim = {"column": 0, "row": 1, "embedding": opts.embedding_sharding_dim}[rule]
    return torch.cat(parts, dim=dim)


def full_shapes(spec: ModelSpec, names: set[str]) -> dict[str, tuple[int, ...]]:
    """The unsplit shape of every global tensor name (TensorRT-LLM's Llama layout, [out, in] linears)."""
    q, kv = _qkv_sizes(spec)
    d, f, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    by_suffix = {"input_layernorm.weight": (d,), "post_layernorm.weight": (d,), "attention.qkv.weight": (q + 2 * kv, d),
                 "attention.dense.weight": (d, q), "mlp.fc.weight": (f, d), "mlp.gate.weight": (f, d),
                 "mlp.proj.weight": (d, f)}
    top = {"transformer.vocab_embedding.weight": (v, d), "lm_head.weight": (v, d), "transformer.ln_f.weight": (d,)}
    return {n: top[n] if n in top else by_suffix[n.split(".", 3)[3]] for n in names}


def rank_shapes(spec: ModelSpec, names: set[str], opts: TrtllmOptions, rank: RankMapping) -> dict[str, tuple[int, ...]]:
    """Local name -> shape of every tensor in this rank's file (the split rules applied to meta tensors)."""
    out = {}
    for name, shape in full_shapes(spec, names).items():
        local = rank.local_name(name)
        if local is not None:
            out[local] = tuple(shard(name, torch.empty(shape, device="meta"), spec, opts, rank.tp_rank).shape)
    return out


def rank_tensors(full: dict[str, torch.Tensor], spec: ModelSpec, opts: TrtllmOptions,
                 rank: RankMapping) -> dict[str, torch.Tensor]:
    """This rank's file: its stage's tensors under their local names, each its tensor-parallel part."""
    out = {}
    for name, w in full.items():
        local = rank.local_name(name)
        if local is not None:
            out[local] = shard(name, w, spec, opts, rank.tp_rank).contiguous()
    return out


def merge_ranks(load: Callable[[RankMapping], dict[str, torch.Tensor]], names: set[str], spec: ModelSpec,
                opts: TrtllmOptions, where: str) -> dict[str, torch.Tensor]:
    """The global tensors from every rank's file (`load(rank)` reads one): each file must hold exactly its
    expected names, shapes and one dtype; replicated tensors must agree bit for bit."""
    ranks = opts.ranks(spec.num_layers)
    files = {}
    dtypes = set()
    for rank in ranks:
        tensors = load(rank)
        expected = rank_shapes(spec, names, opts, rank)
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise EngineDirError(f"{where}: rank{rank.rank}.safetensors does not match config.json's layer_configs "
                                 f"and mapping (missing {missing[:3]}, unexpected {extra[:3]})")
        for local, shape in expected.items():
            if tuple(tensors[local].shape) != shape:
                raise EngineDirError(f"{where}: rank{rank.rank}.safetensors: {local} has shape "
                                     f"{tuple(tensors[local].shape)}, expected {shape}")
            dtypes.add(tensors[local].dtype)
        files[rank.rank] = tensors
    if len(dtypes) > 1:
        raise EngineDirError(f"{where}: the rank files mix dtypes {sorted(map(str, dtypes))}")
    out = {}
    for name in names:
        holders = [r for r in ranks if r.local_name(name) is not None]
        stage = holders[0].pp_rank  # every name lives on exactly one pipeline stage
        parts = [files[r.rank][r.local_name(name)] for r in sorted(holders, key=lambda r: r.tp_rank)
                 if r.pp_rank == stage]
        out[name] = merge(name, parts, spec, opts)
    return out
