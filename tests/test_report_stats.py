"""The quality report's intervals, paired verdicts and matched-speedup comparisons, from hand-made records."""

from __future__ import annotations

import json

import pytest

from adaskip.eval import report, stats


def _records(methods: dict[tuple[str, int, str], dict]) -> list[dict]:
    """Records as the runner writes them: per (method, K, mode) a list of retrieval scores, ROUGE-L per summary,
    KL per LM document, and ideal speedups."""
    out = []
    for (method, k, mode), spec in methods.items():
        base = {"method": method, "k": k, "mode": mode, "context": 1024, "skipped": k}
        key = f"{method}|K={k}|{mode}"
        sp = {"prefill": spec["speed"][0], "decode": spec["speed"][1], "decode_steps": 7, "context_len": 1024}
        for i, score in enumerate(spec["retrieval"]):
            doc = f"passkey-1024-s0-{i}"
            out.append({**base, "sample": doc, "id": f"{key}|{doc}|q0", "task": "passkey", "score": float(score),
                        "speedup": sp})
            out.append({**base, "sample": doc, "id": f"{key}|{doc}|done", "task": "done", "seconds": 1.5})
        for i, (rouge, kl) in enumerate(zip(spec["rouge"], spec["kl"])):
            doc = f"summary-1024-s0-{i}"
            out.append({**base, "sample": doc, "id": f"{key}|{doc}|summary", "task": "summary", "score": rouge,
                        "speedup": sp})
            out.append({**base, "sample": doc, "id": f"{key}|{doc}|lm", "task": "lm", "nll": [1.0, 1.0],
                        "kl": [kl, kl], "speedup": sp})
    return out


def _fixture() -> list[dict]:
    right = [1] * 60 + [0] * 40
    ours = [1] * 70 + [0] * 30  # ours alone answers questions 60-69: McNemar p = 2 * 0.5^10
    ten = range(10)
    return _records({
        ("full", 0, "prefill"): {"retrieval": [1] * 80 + [0] * 20, "rouge": [1.0] * 10, "kl": [0.0] * 10,
                                 "speed": (1.0, 1.0)},
        ("adaskip", 4, "prefill"): {"retrieval": ours, "rouge": [0.5 + 0.01 * i for i in ten],
                                    "kl": [0.1 + 0.001 * i for i in ten], "speed": (1.12, 1.10)},
        ("early-exit", 4, "prefill"): {"retrieval": right, "rouge": [0.5 + 0.01 * i + (0.2 if i % 2 else -0.2)
                                                                     for i in ten],
                                       "kl": [2.0 + 0.01 * i for i in ten], "speed": (1.15, 1.12)},
        ("unified", 4, "prefill"): {"retrieval": [0] * 100, "rouge": [0.1] * 10, "kl": [4.0] * 10,
                                    "speed": (1.15, 1.12)},
        ("adaskip", 8, "prefill"): {"retrieval": [1] * 50 + [0] * 50, "rouge": [0.4] * 10, "kl": [0.3] * 10,
                                    "speed": (1.25, 1.2)},
    })


def test_rows_carry_intervals():
    rows = {(r["method"], r["k"]): r for r in report.aggregate(_fixture(), by_context=True)}
    ours = rows[("adaskip", 4)]
    assert ours["retrieval"] == 0.7 and ours["retrieval_n"] == 100
    assert ours["retrieval_ci"] == pytest.approx([stats.proportion_ci(70, 100).low, stats.proportion_ci(70, 100).high])
    low, high = ours["rougeL_ci"]
    assert low < ours["rougeL"] < high and ours["documents"] == 110
    assert rows[("unified", 4)]["kl_ci"] == [4.0, 4.0]  # every document the same


def test_paired_verdicts_against_the_best_baseline():
    records = _fixture()
    per_context = report.aggregate(records, by_context=True)
    [v] = report.verdicts(per_context, "adaskip", report.unit_values(records))
    assert (v["k"], v["mode"]) == (4, "prefill")
    r = v["retrieval"]  # early-exit is the best baseline (60% vs unified 0%)
    assert r["baseline"] == "early-exit" and r["verdict"] == "beats"
    assert tuple(r["comparison"]["discordant"]) == (10, 0)
    assert r["comparison"]["p_value"] == pytest.approx(2 * 0.5 ** 10)
    assert v["kl"]["verdict"] == "beats" and v["kl"]["baseline"] == "early-exit"
    # ROUGE-L: early-exit's summaries scatter +-0.2 around ours: neither better nor a tie within 0.05
    assert v["rougeL"]["verdict"] == "inconclusive" and v["rougeL"]["ok"]
    # a partly finished run: only the questions both methods answered are paired
    cut = [x for x in records if not (x["method"] == "early-exit" and x["sample"] == "passkey-1024-s0-99")]
    [v] = report.verdicts(report.aggregate(cut, by_context=True), "adaskip", report.unit_values(cut))
    assert v["retrieval"]["comparison"]["n"] == 99


def test_matched_speed_compares_configurations_that_reach_each_speedup():
    records = _fixture()
    rows = report.aggregate(records, by_context=True)
    vs = report.matched_speed(rows, report.unit_values(records))
    prefill = {v["speedup"]: v for v in vs if v["mode"] == "prefill"}
    # at >= 1.1x both adaskip K=4 (1.12) and the baselines (1.15) qualify; at 1.15 only adaskip K=8 (1.25) does on
    # our side; 1.3x: no baseline reaches it, so no comparison
    assert set(prefill) == {1.02, 1.05, 1.1, 1.15}
    assert prefill[1.1]["retrieval"]["ours_k"] == 4 and prefill[1.1]["retrieval"]["verdict"] == "beats"
    at = prefill[1.15]["retrieval"]
    assert (at["ours_k"], at["baseline"], at["ours"]) == (8, "early-exit", 0.5)
    assert at["verdict"] == "loses"  # 50% vs 60% on the same questions: 10 discordant, all theirs
    assert report.target_misses(vs) == ["prefill 1.15x retrieval", "prefill 1.15x rougeL"]


def test_report_renders_intervals_verdicts_and_the_frontier(tmp_path):
    records = _fixture()
    meta = {"model": "m", "layers": 4, "contexts": [1024], "commands": ["adaskip-eval ..."], "threads": 2,
            "options": {"samples": 10, "questions": 100, "seed": 0, "calib_prompts": 2, "calib_tokens": 256,
                        "window": 20, "summary_tokens": 8, "lm_tokens": 2}}
    data = report.write_outputs(records, tmp_path, meta, None, tmp_path / "docs" / "quality.md")
    text = (tmp_path / "quality.md").read_text()
    assert "70 (60–79)" in text  # 70/100 with its exact interval
    assert "**beats** 70 vs 60 (early-exit, n=100); Δ +10 (+4, +10), p=0.002" in text
    assert "At matched ideal speedup (1024 tokens)" in text and "| prefill | 1.15x |" in text
    assert "Frontier: every configuration by ideal speedup" in text
    assert "(no **loses**)? no: prefill 1.15x retrieval, prefill 1.15x rougeL (targets compared: 1.02x–1.15x; " \
        "12 of 12 comparisons have an interval)." in text
    assert "Compute: 0.21 h of evaluation" in text  # 5 rows x 100 timed documents x 1.5 s
    assert (tmp_path / "quality-frontier.png").stat().st_size > 0
    assert (tmp_path / "docs" / "quality-m-frontier.png").is_file()
    assert "quality-m-frontier.png" in (tmp_path / "docs" / "quality.md").read_text()
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["matched_speed"]["1024"] and saved["verdicts"]["1024"][0]["retrieval"]["verdict"] == "beats"
    assert data["compute"]["documents"] == 500


def test_plots_give_a_column_only_to_modes_with_a_skipping_row():
    """The full model's row sits in prefill mode; a run of e2e rows only must not get an empty prefill column."""
    rows = [{"mode": "prefill", "method": "full"}, {"mode": "e2e", "method": "early-exit"},
            {"mode": "e2e", "method": "adaskip+ret"}]
    assert report.plotted_modes(rows) == ["e2e"]
    assert report.plotted_modes(rows + [{"mode": "decode", "method": "adaskip"}]) == ["decode", "e2e"]
    assert report.plotted_modes(rows[:1]) == ["prefill"]  # the full model alone still gets its column
