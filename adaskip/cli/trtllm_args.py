"""adaskip-build's flags for --backend trtllm-checkpoint, filling TrtllmOptions (adaskip/export/trtllm/parallel.py,
which owns their defaults and checks)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from adaskip.cli.common import defaults
from adaskip.export.trtllm.parallel import EMBEDDING_SHARDING, TrtllmOptions


def add_trtllm_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trtllm-checkpoint backend", "parallel mapping of the TensorRT-LLM checkpoint")
    d = defaults(TrtllmOptions)
    g.add_argument("--tp-size", type=int, default=d.tp_size,
                   help="tensor-parallel ranks (TensorRT-LLM's split rules; KV heads replicated when fewer)")
    g.add_argument("--pp-size", type=int, default=d.pp_size,
                   help="pipeline-parallel stages (layers split as TensorRT-LLM does)")
    g.add_argument("--parallel-embedding", choices=tuple(EMBEDDING_SHARDING), default=d.parallel_embedding,
                   help="split the token embedding across tensor-parallel ranks along this dim (default: replicated)")


def trtllm_options(a: argparse.Namespace) -> TrtllmOptions:
    """Each field is the flag of its name."""
    return TrtllmOptions(**{f.name: getattr(a, f.name) for f in fields(TrtllmOptions)})
