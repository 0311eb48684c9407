"""The calibration pass: the ONNX Runtime fast path gives the reference engine's statistics, and finished
calibrations are cached by what they depend on."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_hf

from adaskip.calibrate.corpus import CalibrationSet, load_calibration
from adaskip.calibrate.importance import CalibrationCache, calibrate_model, calibration_from_plan
from adaskip.errors import InputError
from adaskip.model import load_model
from adaskip.plan import adaskip_plan, baseline_plan


def _max_diff(a, b) -> float:
    return max(max(abs(x - y) for x, y in zip(a.similarity, b.similarity)),
               max(abs(x - y) for x, y in zip(a.norm_ratio, b.norm_ratio)))


@pytest.mark.parametrize("kind", ["llama", "llama-untied-mha"])
def test_ort_fast_path_matches_the_reference_on_tiny_models(tiny_root, kind):
    model = load_model(str(make_tiny_hf(kind, tiny_root)))
    ids = [[(7 * i + 3 * p) % 300 + 5 for i in range(96)] for p in range(3)]
    data = CalibrationSet(prompts=ids, source="t", digest="d")
    fast, engine = calibrate_model(model, data, progress=False)
    ref, ref_engine = calibrate_model(model, data, engine="torch", progress=False)
    assert (engine, ref_engine) == ("ort", "torch")
    assert _max_diff(fast, ref) <= 1e-5
    assert fast.num_prompts == 3 and fast.data_digest == "d"


def test_ort_fast_path_matches_the_reference_on_smollm2(smollm2, smollm2_tokenizer):
    data = load_calibration(smollm2_tokenizer, 2, 512)
    fast, engine = calibrate_model(smollm2, data, progress=False)
    ref, _ = calibrate_model(smollm2, data, engine="torch", progress=False)
    assert engine == "ort"
    diff = _max_diff(fast, ref)
    assert diff <= 1e-5, diff
    # the selection a build makes from either is the same
    assert adaskip_plan(fast, 8, "e2e", "fp").skip == adaskip_plan(ref, 8, "e2e", "fp").skip


def test_cache_round_trip_and_keys(tmp_path):
    from adaskip.plan import Calibration

    cache = CalibrationCache(tmp_path / "cache")
    data = CalibrationSet(prompts=[[1, 2, 3], [4, 5]], source="s", digest="sha256:aa")
    calib = Calibration(similarity=[0.5, 0.9], norm_ratio=[1.1, 1.0], num_prompts=2, prompt_tokens=3,
                        data_digest="sha256:aa", source="s")
    assert cache.get("fp", data) is None
    cache.put("fp", data, calib, "ort")
    assert cache.get("fp", data) == (calib, "ort")
    assert cache.get("other-model", data) is None  # another model's weights
    assert cache.get("fp", CalibrationSet(prompts=[[1, 2, 3]], source="s", digest="sha256:bb")) is None
    for f in (tmp_path / "cache").glob("*.json"):  # a damaged file is a miss, not a crash
        f.write_text("{not json")
    assert cache.get("fp", data) is None


def test_calibration_from_plan(tmp_path):
    from adaskip.plan import Calibration

    calib = Calibration(similarity=[0.5, 0.9, 0.7, 0.8], norm_ratio=[1.0] * 4, num_prompts=1, prompt_tokens=3,
                        data_digest="d", source="s")
    path = tmp_path / "plan.json"
    adaskip_plan(calib, 2, "e2e", "fp").save(path)
    assert calibration_from_plan(path, "fp") == calib
    with pytest.raises(InputError, match="another model"):
        calibration_from_plan(path, "other")
    baseline_plan("early-exit", 2, 1, "e2e", "fp").save(tmp_path / "b.json")
    with pytest.raises(InputError, match="no calibration"):
        calibration_from_plan(tmp_path / "b.json", "fp")
    assert json.loads(path.read_text())["calibration"]["similarity"] == calib.similarity


def test_channel_sums_are_cached_beside_the_statistics(tiny_root, tmp_path, monkeypatch):
    """A fitted stand-in's torch pass is cached with its channel sums: a second build with another K reuses both,
    gives the same compensation, and the statistics serve a norm-ratio build too; damaged sums are a miss."""
    import torch

    from adaskip.calibrate import compensation as comp

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = load_model(str(make_tiny_hf("llama", tiny_root)))
    ids = [[(5 * i + 11 * p) % 300 + 5 for i in range(64)] for p in range(2)]
    data = CalibrationSet(prompts=ids, source="t", digest="sha256:cc")
    calib, stats, cached = comp.cached_collect(model, data, progress=False)
    assert not cached
    again, stats2, cached = comp.cached_collect(model, data, progress=False)
    assert cached and again == calib
    for name, tensor in stats.to_dict().items():
        assert torch.equal(tensor, getattr(stats2, name)), name
    assert comp.fit("channel-affine", stats2, again)[1] == comp.fit("channel-affine", stats, calib)[1]
    cache = CalibrationCache()
    assert cache.get(model.fingerprint, data) == (calib, "torch")  # a norm-ratio build's hit
    cache.put(model.fingerprint, data, calib, "ort")  # a later ORT pass keeps the sums
    assert cache.get_channels(model.fingerprint, data) is not None
    for f in (tmp_path / "xdg").rglob("*.channels.pt"):
        f.write_bytes(b"damaged")
    assert cache.get_channels(model.fingerprint, data) is None
    assert comp.cached_collect(model, data, use_cache=False, progress=False)[2] is False
