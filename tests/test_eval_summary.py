"""adaskip-eval-summary: the reports' own matched-speed verdicts gathered into one table, and bad input refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_report_stats import _fixture

from adaskip.cli import eval_summary
from adaskip.eval import report, summary

META = {"model": "m", "layers": 4, "contexts": [1024], "commands": ["adaskip-eval ..."], "threads": 2,
        "options": {"samples": 10, "questions": 100, "seed": 0, "calib_prompts": 2, "calib_tokens": 256,
                    "window": 20, "summary_tokens": 8, "lm_tokens": 2}}


def _code(argv: list[str]) -> int:
    """The exit status of the command (input errors return 2; argparse's exit 2 too)."""
    try:
        return eval_summary.main(argv)
    except SystemExit as e:
        return int(e.code)


@pytest.fixture()
def docs(tmp_path):
    """A report written with --doc (its data JSON beside it) and a hand-written document to summarize into."""
    d = tmp_path / "docs"
    (tmp_path / "out").mkdir()
    report.write_outputs(_fixture(), tmp_path / "out", META, None, d / "quality-paired.md")
    (d / "quality.md").write_text("# Quality\n\nA hand-written reading that must survive.\n")
    return d


def test_the_report_leaves_its_data_beside_the_document(docs):
    data = json.loads((docs / "quality-paired-m.json").read_text())
    assert data["meta"]["doc"] == "quality-paired.md" and data["matched_speed"]["1024"]


def test_the_table_repeats_the_reports_verdicts_span_by_span(docs):
    assert eval_summary.main([str(docs / "quality-paired-m.json"), "--doc", str(docs / "quality.md")]) == 0
    text = (docs / "quality.md").read_text()
    assert text.startswith("# Quality\n\nA hand-written reading that must survive.\n")
    [row] = [ln for ln in text.splitlines() if ln.startswith("| m |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:6] == ["m", "1024", "prefill", "`adaskip`", "early-exit K=4; unified K=4",
                         "**no**: retrieval at 1.15x, rougeL at 1.15x"]
    # 1.02-1.10x: adaskip K=4 beats early-exit K=4 (70 vs 60 on the same questions); 1.15x: only adaskip K=8 is
    # that fast on our side, and loses (the same cells report.matched_speed gave the report)
    assert cells[6] == ("**beats** at 1.02–1.10x: 70% (K=4) vs 60% (early-exit K=4), Δ +10 (+4, +10), p=0.002; "
                        "**loses** at 1.15x: 50% (K=8) vs 60% (early-exit K=4), Δ -10 (-10, -4), p=0.002")
    assert cells[8].startswith("**beats** at 1.02–1.10x: 0.1045 vs 2.0450")
    assert cells[9] == "[quality-paired](quality-paired.md)"
    # rerunning replaces the generated block, it does not add a second one
    eval_summary.main([str(docs / "quality-paired-m.json"), "--doc", str(docs / "quality.md")])
    again = (docs / "quality.md").read_text()
    assert again == text and again.count("<!-- adaskip-eval: matched-speed -->") == 1


def test_speedups_above_the_limit_are_left_out(docs):
    data = summary.load(docs / "quality-paired-m.json")
    [row] = summary.summary_rows(data, "r", up_to=1.05)
    assert row["retrieval"].startswith("**beats** at 1.02–1.05x") and row["target"] == "yes"


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "absent.json", "does not exist"),
    (lambda d: (d / "bad.json").write_text("{not json") and d / "bad.json", "is not readable JSON"),
    (lambda d: (d / "list.json").write_text("[1, 2]") and d / "list.json", "is not an adaskip-eval report"),
    (lambda d: (d / "nometa.json").write_text('{"matched_speed": {}, "per_context": []}') and d / "nometa.json",
     "is not an adaskip-eval report"),
    (lambda d: (d / "empty.json").write_text(json.dumps({"meta": {"model": "m"}, "matched_speed": {},
                                                         "per_context": []})) and d / "empty.json",
     "has a matched-speed comparison"),
])
def test_bad_reports_exit_2_with_one_line_and_leave_the_document(docs, capsys, make, message):
    before = (docs / "quality.md").read_text()
    code = _code([str(make(docs)), "--doc", str(docs / "quality.md")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert (docs / "quality.md").read_text() == before


@pytest.mark.parametrize("args, message", [
    (["--up-to", "1.0"], "must be above 1"),
    (["--up-to", "nan"], "must be above 1"),
    (["--doc-is-dir"], "is not a file"),
])
def test_bad_flags_exit_2(docs, capsys, args, message):
    doc = docs / "quality.md"
    if args == ["--doc-is-dir"]:
        doc, args = docs, []
    code = _code([str(docs / "quality-paired-m.json"), "--doc", str(doc), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12)
REPORTISH = st.fixed_dictionaries({"meta": st.fixed_dictionaries({"model": st.text(max_size=8)}, optional={"doc": JSON}),
                                   "matched_speed": st.dictionaries(st.sampled_from(["1024", "x", ""]), JSON,
                                                                    max_size=2),
                                   "per_context": st.lists(JSON, max_size=3)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(JSON, REPORTISH))
def test_any_json_gets_a_table_or_one_line_and_exit_2(docs, capsys, data):
    path = docs / "fuzz.json"
    path.write_text(json.dumps(data))
    before = (docs / "quality.md").read_text()
    code = _code([str(path), "--doc", str(docs / "quality.md")])
    err = capsys.readouterr().err.strip()
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert len(err.splitlines()) == 1 and (docs / "quality.md").read_text() == before
