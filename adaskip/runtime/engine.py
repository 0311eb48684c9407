"""The Engine protocol every backend implements, and the tensors it exchanges.

A forward takes token ids plus, per request row, which sublayers to skip and the scale a skipped sublayer applies
(h' = scale * h). It returns logits and, for every sublayer that ran, its IO similarity and norm ratio (NaN where
skipped). Which sublayers to skip is never decided here: SkipPolicy decides, the Generator passes the mask in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from adaskip.model.spec import ModelSpec

# The contract between the ONNX exporter and the graph runtimes (Python and C++): bump when graph inputs/outputs
# change; runtimes refuse graphs of another interface.
GRAPH_INTERFACE = 1


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, vocab] (last position) or [B, T, vocab] (all positions)
    similarity: torch.Tensor  # [B, 2L] float32, NaN for skipped sublayers
    norm_ratio: torch.Tensor  # [B, 2L] float32, NaN for skipped sublayers


class KVCacheLike(Protocol):
    length: int

    def nbytes(self) -> int: ...


class Engine(Protocol):
    spec: ModelSpec

    def new_cache(self, batch: int, capacity: int, cached_layers: list[int]) -> KVCacheLike:
        """A KV cache for `batch` rows of up to `capacity` tokens, holding K/V only for `cached_layers`."""

    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, cache: KVCacheLike, skip: torch.Tensor,
                scales: torch.Tensor, all_logits: bool = False, want_stats: bool = True) -> StepOutput:
        """ids/valid: [B, T] (left-padded; valid marks real tokens); skip: [B, 2L] bool; scales: [B, 2L].
        want_stats=False lets a backend skip the similarity computation (stats then come back NaN)."""

    def decode(self, tokens: torch.Tensor, cache: KVCacheLike, skip: torch.Tensor,
               scales: torch.Tensor, want_stats: bool = True) -> StepOutput:
        """tokens: [B]; one new position per row."""
