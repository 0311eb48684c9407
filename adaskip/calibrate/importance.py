"""Offline importance learning: run the full model over the calibration prompts and average the per-sublayer
IO similarity and norm ratio per request, then over requests (docs/architecture.md, "The method").

The pass runs on the `ort` graph of the unskipped model on ONNX Runtime (its IOSimilarity outputs under
want_stats) where the model allows it, else on the reference torch engine; both give the same statistics (tested
within 1e-5). Measured on SmolLM2, one 2048-token prompt with statistics, 2 threads, a quiet machine: ONNX Runtime
3.9 s, torch 4.3 s, so the engine choice saves little; what saves the time is the cache: a finished calibration is
kept, keyed by what it depends on (model fingerprint, the prompts' token digest), so a second build with another K,
mode or method does not calibrate again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adaskip.calibrate.corpus import CALIBRATION_ENGINES, CalibrationSet
from adaskip.errors import InputError, check_choice
from adaskip.export.onnx.graph import build_onnx
from adaskip.export.onnx.save import save_onnx
from adaskip.export.onnx.variants import choose_variant
from adaskip.layout import SkipLayout
from adaskip.model.spec import LoadedModel
from adaskip.plan import Calibration, SkipPlan, baseline_plan
from adaskip.runtime.engine import Engine
from adaskip.runtime.ort_engines import OrtGqaEngine
from adaskip.runtime.torch_engine import TorchEngine

CACHE_FORMAT = 1


def calibrate(engine: Engine, data: CalibrationSet, progress: bool = True) -> Calibration:
    """The statistics of the full model over `data` on `engine` (any Engine: one prefill per prompt with stats)."""
    n = engine.spec.num_sublayers
    sims, ratios = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    no_skip, ones = torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n)
    kv_layers = getattr(engine, "kv_layers", [])  # graph engines keep the cache their graph declares
    for ids in tqdm(data.prompts, desc="calibrate", unit="prompt", disable=not progress, file=sys.stderr):
        x = torch.tensor([ids])
        cache = engine.new_cache(1, len(ids), kv_layers)  # one forward: nothing is kept afterwards
        out = engine.prefill(x, torch.ones_like(x, dtype=torch.bool), cache, no_skip, ones)
        sims += out.similarity[0].double()
        ratios += out.norm_ratio[0].double()
    count = len(data.prompts)
    return Calibration(
        similarity=[float(v) for v in sims / count], norm_ratio=[float(v) for v in ratios / count],
        num_prompts=count, prompt_tokens=max(len(p) for p in data.prompts), data_digest=data.digest,
        source=data.source)


def calibrate_model(model: LoadedModel, data: CalibrationSet, engine: str = "auto", progress: bool = True,
                    threads: int | None = None) -> tuple[Calibration, str]:
    """Calibrate `model` on the fastest engine that gives the reference's statistics. Returns the statistics and the
    engine that produced them ("ort" or "torch")."""
    check_choice(engine, CALIBRATION_ENGINES, "--calib-engine")
    full = SkipLayout.from_plan(baseline_plan("early-exit", model.spec.num_layers, 0, "prefill", model.fingerprint))
    use_ort = engine == "ort" or (engine == "auto" and model.weights["embed"].dtype == torch.float32
                                  and choose_variant(model.spec, full, "ort") == "ort")
    if not use_ort:
        return calibrate(TorchEngine.from_loaded(model), data, progress), "torch"
    with tempfile.TemporaryDirectory(prefix="adaskip-calibrate-") as work:
        save_onnx(build_onnx(model.spec, model.weights, full, variant="ort"), work, check=False)
        # prompts only (nothing for the decode kernels to do), whatever ADASKIP_DECODE_KERNELS says
        ort_engine = OrtGqaEngine(Path(work) / "model.onnx", model.spec, threads=threads, decode_kernels="")
        return calibrate(ort_engine, data, progress), "ort"


class CalibrationCache:
    """Finished calibrations on disk, one JSON file per (model fingerprint, prompt-token digest); written
    atomically, read back only when every recorded key matches. A torch pass that also summed the per-channel
    statistics a fitted stand-in needs (adaskip/calibrate/compensation.py) keeps those sums beside it in a
    `.channels.pt` file, so a second build with a fitted stand-in does not calibrate again either."""

    def __init__(self, root: str | Path | None = None):
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        self.root = Path(root) if root is not None else Path(base) / "adaskip" / "calibration"

    @staticmethod
    def key(fingerprint: str, data: CalibrationSet) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, "fingerprint": fingerprint, "data_digest": data.digest,
                "num_prompts": len(data.prompts), "prompt_tokens": max(len(p) for p in data.prompts)}

    def _path(self, key: dict[str, Any]) -> Path:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.root / f"{name}.json"

    def get(self, fingerprint: str, data: CalibrationSet) -> tuple[Calibration, str] | None:
        key = self.key(fingerprint, data)
        try:
            record = json.loads(self._path(key).read_text())
            if record.get("key") != key:
                return None
            return Calibration(**record["calibration"]), str(record.get("engine", "?"))
        except (OSError, ValueError, TypeError, KeyError):  # missing or damaged: calibrate again
            return None

    def get_channels(self, fingerprint: str, data: CalibrationSet) -> tuple[Calibration, dict[str, torch.Tensor]] | None:
        """The statistics and the per-channel sums of one torch pass, or None (never cached, or damaged)."""
        hit = self.get(fingerprint, data)
        if hit is None:
            return None
        key = self.key(fingerprint, data)
        try:
            record = torch.load(self._path(key).with_suffix(".channels.pt"), weights_only=True)
            if record.get("key") != json.dumps(key, sort_keys=True):
                return None
            return hit[0], record["channels"]
        except Exception:  # torch.load raises many types on a missing or damaged file: calibrate again
            return None

    def put(self, fingerprint: str, data: CalibrationSet, calibration: Calibration, engine: str,
            channels: dict[str, torch.Tensor] | None = None) -> None:
        key = self.key(fingerprint, data)
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if channels is not None:  # first, so a statistics file never points at half-written sums
                self._replace(path.with_suffix(".channels.pt"),
                              lambda tmp: torch.save({"key": json.dumps(key, sort_keys=True),
                                                      "channels": channels}, tmp))
            record = json.dumps({"key": key, "engine": engine, "calibration": asdict(calibration)})
            self._replace(path, lambda tmp: tmp.write_text(record))
        except OSError:  # a cache that cannot be written only costs time next build
            pass

    @staticmethod
    def _replace(path: Path, write: Any) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write(tmp)
        os.replace(tmp, path)


def cached_calibration(model: LoadedModel, data: CalibrationSet, engine: str = "auto", use_cache: bool = True,
                       progress: bool = True, threads: int | None = None) -> tuple[Calibration, str, bool]:
    """calibrate_model through the cache: (statistics, the engine that computed them, whether they came from it)."""
    cache = CalibrationCache() if use_cache else None
    hit = cache.get(model.fingerprint, data) if cache else None
    if hit is not None:
        return hit[0], hit[1], True
    calib, used = calibrate_model(model, data, engine, progress=progress, threads=threads)
    if cache:
        cache.put(model.fingerprint, data, calib, used)
    return calib, used, False


def calibration_from_plan(path: str | Path, fingerprint: str) -> Calibration:
    """The statistics stored in an earlier plan (adaskip-build --calibration plan.json): re-select without a pass."""
    plan = SkipPlan.load(path)
    if plan.fingerprint != fingerprint:
        raise InputError(f"{path} was calibrated for another model (fingerprint differs)")
    if plan.calibration is None:
        raise InputError(f"{path} holds no calibration statistics (a baseline plan); pass an AdaSkip plan")
    return plan.calibration
