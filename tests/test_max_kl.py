"""adaskip-build --max-kl X: the largest skip set whose held-out next-token KL stays under X."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adaskip.calibrate import budget
from adaskip.calibrate import compensation as comp
from adaskip.calibrate.corpus import CalibrationOptions, load_calibration, load_heldout
from adaskip.cli.build import main
from adaskip.model import load_model
from adaskip.model.tokenizer import load_tokenizer
from adaskip.plan import SkipPlan, rank_by_similarity
from adaskip.runtime.torch_engine import TorchEngine

CAL = ["--calib-prompts", "2", "--calib-tokens", "128", "--no-calib-cache", "--backend", "torch", "-q"]


def test_heldout_slice_is_disjoint_from_the_calibration_prompts(smollm2_tokenizer):
    cal = CalibrationOptions(prompts=3, tokens=256)
    calib = load_calibration(smollm2_tokenizer, 3, 256)
    held = load_heldout(smollm2_tokenizer, cal, 2, 128)
    assert [len(p) for p in held.prompts] == [128, 128] and held.source.startswith("held-out:")
    text = [t for p in calib.prompts for t in p]
    body = [t for p in held.prompts for t in p]
    # consecutive windows of one token stream: the held-out slice starts where the calibration windows end
    stream = smollm2_tokenizer.encode(__import__("adaskip.calibrate.corpus", fromlist=["x"]).builtin_text(),
                                      add_special_tokens=False)
    assert stream[:len(text)] == text and stream[len(text):len(text) + len(body)] == body
    assert load_heldout(smollm2_tokenizer, cal, 2, 128).digest == held.digest  # deterministic


def decode_steps_kl(engine: TorchEngine, windows: list[list[int]], reference: list[torch.Tensor], skip: list[int],
                    scales: list[float]) -> float:
    """Decode mode measured the slow, obvious way: each window's first half prefilled by the full model, then one
    decode step per token of its second half with `skip`; mean over windows of the mean KL at those steps."""
    n, half = engine.spec.num_sublayers, len(windows[0]) // 2
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, skip] = True
    kls = []
    for ids, ref in zip(windows, reference):
        cache = engine.new_cache(1, len(ids), list(range(engine.spec.num_layers)))
        x = torch.tensor([ids[:half]])
        engine.prefill(x, torch.ones_like(x, dtype=torch.bool), cache, torch.zeros(1, n, dtype=torch.bool),
                       torch.ones(1, n), want_stats=False)
        steps = [engine.decode(torch.tensor([t]), cache, mask, torch.tensor([scales]), want_stats=False).logits
                 for t in ids[half:]]
        kls.append(float(comp.kl_divergence(ref[half:], torch.cat(steps)).mean()))
    return sum(kls) / len(kls)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_max_kl_picks_the_largest_set_under_the_bound(tiny_chat_model, tmp_path, capsys, mode):
    """The bound is measured where the mode skips: every forward (prefill/e2e), or decode steps after an unskipped
    prompt (decode), re-measured here independently of the build's scorer."""
    model = load_model(str(tiny_chat_model))
    tok = load_tokenizer(model)
    cal = CalibrationOptions(prompts=2, tokens=128)
    calib = comp.collect(TorchEngine.from_loaded(model), load_calibration(tok, 2, 128), progress=False)[0]
    held = load_heldout(tok, cal, budget.HELDOUT_WINDOWS, 128).prompts
    ranking = rank_by_similarity(calib.similarity)
    engine = TorchEngine.from_loaded(model)
    ref = comp.reference_logits(engine, held)

    def kl(k: int) -> float:
        if mode == "decode":
            return decode_steps_kl(engine, held, ref, ranking[:k], list(calib.norm_ratio))
        return comp.mean_kl(model.weights, model.spec, held, ref, ranking[:k], list(calib.norm_ratio), None)

    trace = [kl(k) for k in range(1, len(ranking) + 1)]
    # a bound between a running maximum and the next K's larger KL: the answer is that K
    k_star = next(i for i in range(1, len(trace)) if trace[i] > max(trace[:i]))
    bound = (max(trace[:k_star]) + trace[k_star]) / 2
    out = tmp_path / "engine"
    assert main(["--model", str(tiny_chat_model), "-o", str(out), "--max-kl", repr(bound), "--mode", mode,
                 *CAL]) == 0
    plan = SkipPlan.load(out / "plan.json")
    assert plan.k == k_star and plan.skip == ranking[:k_star]
    # re-measured on the held-out slice: under the bound; one more sublayer along the ranking: over it
    assert kl(plan.k) <= bound < kl(plan.k + 1)
    sel = plan.selection
    assert sel["rule"] == "max-kl" and sel["max_kl"] == bound and sel["k"] == k_star
    assert sel["heldout_kl"] == pytest.approx(kl(plan.k), rel=1e-4)
    assert sel["heldout"]["measure"] == budget.MEASURES[comp.phase_of(mode)]
    assert sel["heldout"]["windows"] == budget.HELDOUT_WINDOWS and sel["heldout"]["source"].startswith("held-out:")
    assert sel["expected_speedup"][mode] > 1.0  # its ideal speedup, recorded and printed
    printed = capsys.readouterr().out
    assert f"max-kl: K={k_star} is the largest set" in printed and "ideal speedup at" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["options"]["max_kl"] == bound


@pytest.mark.parametrize("extra, message", [
    (["--max-kl", "-0.1"], "--max-kl is a next-token KL bound"),
    (["--max-kl", "nan"], "--max-kl is a next-token KL bound"),
    (["--max-kl", "inf"], "--max-kl is a next-token KL bound"),
    (["--max-kl", "0.1", "--skip", "2"], "give exactly one of --skip K, --alpha A or --max-kl X"),
    (["--max-kl", "0.1", "--alpha", "1.2"], "give exactly one of"),
    (["--max-kl", "0.1", "--method", "early-exit"], "--max-kl selects AdaSkip sublayers"),
])
def test_max_kl_bad_values(tiny_chat_model, tmp_path, capsys, extra, message):
    out = tmp_path / "engine"
    assert main(["--model", str(tiny_chat_model), "-o", str(out), *extra, *CAL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not out.exists()


def test_bound_check():
    for good in (1e-6, 0.1, 3):
        budget.check_bound(good)
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(Exception, match="--max-kl"):
            budget.check_bound(bad)
