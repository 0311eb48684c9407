"""Offline importance learning: run the full model over the calibration prompts and average the per-sublayer
IO similarity and norm ratio per request, then over requests (docs/architecture.md, "The method")."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from adaskip.calibrate.corpus import CalibrationSet
from adaskip.plan import Calibration
from adaskip.runtime.torch_engine import TorchEngine


def calibrate(engine: TorchEngine, data: CalibrationSet, progress: bool = True) -> Calibration:
    n = engine.spec.num_sublayers
    sims, ratios = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    no_skip, ones = torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n)
    for ids in tqdm(data.prompts, desc="calibrate", unit="prompt", disable=not progress, file=sys.stderr):
        x = torch.tensor([ids])
        cache = engine.new_cache(1, len(ids), cached_layers=[])  # one forward: nothing to keep
        out = engine.prefill(x, torch.ones_like(x), cache, no_skip, ones)
        sims += out.similarity[0].double()
        ratios += out.norm_ratio[0].double()
    count = len(data.prompts)
    return Calibration(
        similarity=[float(v) for v in sims / count], norm_ratio=[float(v) for v in ratios / count],
        num_prompts=count, prompt_tokens=max(len(p) for p in data.prompts), data_digest=data.digest,
        source=data.source)
