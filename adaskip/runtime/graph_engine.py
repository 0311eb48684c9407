"""What every engine that runs an exported graph shares (ONNX Runtime's two variants, TensorRT): the graph's KV
layers against the plan's, prefill preconditions, the batch-wide rule for attention decisions, and turning the
graph's raw statistics into a StepOutput. Each backend keeps only its own binding of inputs and outputs."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from adaskip.errors import EngineDirError, InputError
from adaskip.model.spec import ModelSpec
from adaskip.runtime.engine import KVCacheLike, StepOutput


def kv_layers_of(input_names: list[str]) -> list[int]:
    """The layers a graph keeps K/V for, from its `past_key_<i>` inputs."""
    return sorted(int(m.group(1)) for n in input_names if (m := re.fullmatch(r"past_key_(\d+)", n)))


class GraphEngine:
    dtype = torch.float32
    supports_all_logits = False  # the exported graphs return last-position logits only
    spec: ModelSpec
    kv_layers: list[int]

    def new_cache(self, batch: int, capacity: int, cached_layers: list[int]) -> KVCacheLike:
        if sorted(cached_layers) != self.kv_layers:
            raise EngineDirError(f"the graph holds KV for layers {self.kv_layers}, the plan's policy wants "
                                 f"{sorted(cached_layers)}: engine and plan do not belong together")
        return self._make_cache(batch, capacity)

    def _make_cache(self, batch: int, capacity: int) -> KVCacheLike:
        raise NotImplementedError

    @staticmethod
    def _check_prefill(cache: Any, all_logits: bool) -> None:
        if all_logits:
            raise InputError("this graph returns last-position logits only")
        if cache.length:
            raise InputError("prefill needs an empty cache")

    @staticmethod
    def _check_skip(skip: torch.Tensor) -> np.ndarray:
        skip_np = np.ascontiguousarray(skip.numpy().astype(bool))
        attention = skip_np[:, 0::2]  # attention decisions are offline: the same for every row
        split = np.flatnonzero(attention.any(axis=0) & ~attention.all(axis=0))
        if len(split):
            raise ValueError(f"attention of layer {int(split[0])} must be skipped for all rows of a batch or none")
        return skip_np

    @staticmethod
    def _step_output(out: dict[str, np.ndarray], skip_np: np.ndarray) -> StepOutput:
        sims, ratios = out["similarity"].copy(), out["norm_ratio"].copy()
        sims[skip_np], ratios[skip_np] = np.nan, np.nan  # rows that skipped report nothing, as in the torch engine
        return StepOutput(logits=torch.from_numpy(out["logits"]), similarity=torch.from_numpy(sims),
                          norm_ratio=torch.from_numpy(ratios))

    @staticmethod
    def _prompt_positions(next_pos: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Positions of a left-padded prompt batch (the portable interface): each row counts its valid tokens."""
        return (next_pos[:, None] + np.maximum(np.cumsum(valid, axis=1) - 1, 0)).astype(np.int64)
