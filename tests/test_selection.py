"""adaskip-build --select kl / retrieval: the greedy orders adaskip-eval evaluates, built into an engine."""

from __future__ import annotations

import json

import pytest

from adaskip import cost
from adaskip.calibrate import budget
from adaskip.calibrate import compensation as comp
from adaskip.calibrate.corpus import CalibrationOptions, load_heldout
from adaskip.cli.build import main
from adaskip.eval.runner import EvalOptions, Evaluator, parse_method
from adaskip.model import load_model
from adaskip.model.tokenizer import load_tokenizer
from adaskip.plan import SkipPlan
from adaskip.runtime.torch_engine import TorchEngine

CAL = ["--calib-prompts", "2", "--calib-tokens", "128", "--no-calib-cache", "--backend", "torch", "-q"]
GREEDY = ["--stand-in", "channel-affine"]
PROBES = ["--probes", "3", "--probe-tokens", "256"]


@pytest.mark.parametrize("select, mode, method", [
    ("retrieval", "e2e", "adaskip+channel-affine+ret256+em"),
    ("retrieval", "decode", "adaskip+channel-affine+ret256+served+em"),
    ("kl", "prefill", "adaskip+channel-affine+kl"),
])
def test_the_build_selects_what_the_eval_evaluated(tiny_chat_model, tmp_path, capsys, select, mode, method):
    """One recipe: the build's --select order is the evaluation's method order for the same calibration, candidates,
    windows and probes (a decode-mode build scores its skips on decode steps, as the eval's `served` does)."""
    out = tmp_path / "engine"
    extra = PROBES if select == "retrieval" else []
    assert main(["--model", str(tiny_chat_model), "-o", str(out), "--select", select, "--skip", "3", "--mode", mode,
                 "--select-candidates", "6", *GREEDY, *extra, *CAL]) == 0
    plan = SkipPlan.load(out / "plan.json")
    ranked = plan.selection["ranking"]
    assert ranked["by"] == select and ranked["candidates"] == 6 and ranked["tried"] == 6
    assert ranked["phase"] == comp.phase_of(mode) and ranked["order"] == plan.skip and len(plan.skip) == 3
    if select == "retrieval":
        assert (ranked["probes"], ranked["probe_tokens"], ranked["answers_first"]) == (3, 256, True)
    else:
        assert ranked["probes"] == 0 and "probe_tokens" not in ranked
    printed = capsys.readouterr().out
    assert f"selection: {select} (greedy over the 6 most similar sublayers" in printed

    ev = Evaluator(EvalOptions(model=str(tiny_chat_model), out=str(tmp_path / "eval"), methods=[method], budgets=[3],
                               modes=[mode], calib_prompts=2, calib_tokens=128, kl_windows=1, kl_tokens=256,
                               kl_candidates=6, ret_probes=3, progress=False))
    evaluated = ev.plan_for(parse_method(method), 3, mode)
    assert plan.skip == evaluated.skip
    assert plan.compensation.sublayers.keys() == evaluated.compensation.sublayers.keys()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["options"]["select"] == select


def test_max_kl_and_alpha_take_k_along_the_greedy_order(tiny_chat_model, tmp_path, capsys):
    """--max-kl: the largest K along the --select order whose held-out KL stays under the bound (re-measured here);
    --alpha: the smallest K along it that reaches the speedup."""
    full = tmp_path / "all"
    n = load_model(str(tiny_chat_model)).spec.num_sublayers
    assert main(["--model", str(tiny_chat_model), "-o", str(full), "--select", "kl", "--skip", str(n), *GREEDY,
                 *CAL]) == 0
    order = SkipPlan.load(full / "plan.json").skip
    assert sorted(order) == list(range(n))

    model = load_model(str(tiny_chat_model))
    tok = load_tokenizer(model)
    engine = TorchEngine.from_loaded(model)
    plan_all = SkipPlan.load(full / "plan.json")
    held = load_heldout(tok, CalibrationOptions(prompts=2, tokens=128), budget.HELDOUT_WINDOWS, 128).prompts
    scorer = comp.WindowScorer(engine, held)
    stand_in = plan_all.compensation
    trace = [scorer.kl(order[:k], plan_all.scales, stand_in) for k in range(1, n + 1)]
    k_star = next(i for i in range(1, n) if trace[i] > max(trace[:i]))
    bound = (max(trace[:k_star]) + trace[k_star]) / 2

    out = tmp_path / "max-kl"
    assert main(["--model", str(tiny_chat_model), "-o", str(out), "--select", "kl", "--max-kl", repr(bound),
                 "--mode", "prefill", *GREEDY, "--select-candidates", str(n), *CAL]) == 0
    plan = SkipPlan.load(out / "plan.json")
    assert plan.k == k_star and plan.skip == order[:k_star]
    assert trace[plan.k - 1] <= bound < trace[plan.k]
    assert plan.selection["rule"] == "max-kl" and plan.selection["ranking"]["order"] == order

    alpha = cost.ideal_speedup(model.spec, order[:2], 2048, "prefill") - 1e-6
    out = tmp_path / "alpha"
    assert main(["--model", str(tiny_chat_model), "-o", str(out), "--select", "kl", "--alpha", repr(alpha),
                 "--mode", "prefill", "--context-len", "2048", *GREEDY, "--select-candidates", str(n), *CAL]) == 0
    plan = SkipPlan.load(out / "plan.json")
    assert plan.skip == order[:cost.k_for_alpha(model.spec, order, alpha, 2048, "prefill")] and plan.k <= 2


@pytest.mark.parametrize("extra, message", [
    (["--select", "retrieval", "--probes", "0", "--skip", "2"], "--probes must be >= 1"),
    (["--select", "retrieval", "--probe-tokens", "64", "--skip", "2"], "--probe-tokens must be >= 128"),
    (["--select", "retrieval", "--probe-tokens", "128", "--skip", "2"],
     "retrieval probes of 128 tokens: context 128 is too short for the multikey task"),
    (["--select", "retrieval", "--probe-tokens", "2045", "--skip", "2"],
     "--probe-tokens 2045 plus up to 8 answer tokens exceeds the model's context of 2048 tokens"),
    (["--select", "kl", "--select-candidates", "0", "--skip", "2"], "--select-candidates must be >= 1"),
    (["--probes", "3", "--skip", "2"], "--probes applies to --select retrieval; this build selects by similarity"),
    (["--select", "kl", "--probe-tokens", "256", "--skip", "2"], "--probe-tokens applies to --select retrieval"),
    (["--select-candidates", "4", "--skip", "2"], "--select-candidates applies to --select kl or retrieval"),
    (["--select", "kl", "--method", "early-exit", "--skip", "1"], "--select kl ranks AdaSkip sublayers"),
    (["--select", "retrieval", "--skip", "2", "--calibration", "plan.json"],
     "--calibration carries the paper's statistics only; --select retrieval needs a pass"),
    (["--select", "kl", "--plan", "plan.json"], "--plan fixes the selection; drop --select"),
    (["--select", "bogus", "--skip", "2"], "invalid choice: 'bogus'"),
])
def test_bad_select_options(tiny_chat_model, tmp_path, capsys, extra, message):
    out = tmp_path / "engine"
    try:
        code = main(["--model", str(tiny_chat_model), "-o", str(out), *extra, *CAL])
    except SystemExit as e:  # argparse's own refusals (a choice it does not know)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not out.exists()
