"""adaskip-eval-summary: the reports' own matched-speed verdicts gathered into one table, and bad input refused."""

from __future__ import annotations

import json
import os

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
                         "**no**: retrieval at 1.15x; rougeL at 1.15x"]
    # 1.02-1.10x: adaskip K=4 beats early-exit K=4 (70 vs 60 on the same questions); 1.15x: only adaskip K=8 is
    # that fast on our side, and loses (the same cells report.matched_speed gave the report)
    assert cells[6] == ("**beats** at 1.02–1.10x: 70% (K=4) vs 60% (early-exit K=4), Δ +10 (+4, +10), p=0.002; "
                        "**loses** at 1.15x: 50% (K=8) vs 60% (early-exit K=4), Δ -10 (-10, -4), p=0.002")
    assert cells[8].startswith("**beats** at 1.02–1.10x: 0.1045 vs 2.0450")
    assert cells[9] == "[quality-paired](quality-paired.md)"
    # each span's verdict is the report's own at each speedup it covers
    data = json.loads((docs / "quality-paired-m.json").read_text())
    verdicts = {v["speedup"]: v["retrieval"]["verdict"] for v in data["matched_speed"]["1024"]}
    assert verdicts == {1.02: "beats", 1.05: "beats", 1.1: "beats", 1.15: "loses"}
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
    (["--up-to", "1.0"], "finite ideal speedup above 1"),
    (["--up-to", "nan"], "finite ideal speedup above 1"),
    (["--up-to", "inf"], "finite ideal speedup above 1"),
])
def test_bad_flags_exit_2(docs, capsys, args, message):
    before = (docs / "quality.md").read_text()
    code = _code([str(docs / "quality-paired-m.json"), "--doc", str(docs / "quality.md"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert (docs / "quality.md").read_text() == before


START, END = "<!-- adaskip-eval: matched-speed -->", "<!-- /adaskip-eval: matched-speed -->"


@pytest.mark.parametrize("text, message", [
    (f"# Q\n\n{START}\nold table\nmy reading\n", "markers are broken (1 start and 0 end"),
    (f"# Q\n\n{END}\nmy reading\n{START}\n", "markers are broken (1 start and 1 end"),
    (f"# Q\n\n{START}\na\n{END}\nmy reading\n{START}\nb\n{END}\n", "markers are broken (2 start and 2 end"),
    (b"# Q\n\n\xff\xfe not utf-8\n", "is not UTF-8 text"),
])
def test_a_document_that_cannot_take_the_table_is_left_as_it_was(docs, capsys, text, message):
    doc = docs / "quality.md"
    doc.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = doc.read_bytes()
    code = _code([str(docs / "quality-paired-m.json"), "--doc", str(doc)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and doc.read_bytes() == before


def test_a_marker_quoted_in_prose_is_not_a_marker(docs):
    doc = docs / "quality.md"
    doc.write_text(f"# Q\n\nThe tool writes between `{START}` markers.\n\nKey results stay.\n")
    for _ in range(2):  # the second run replaces the block the first appended, and nothing else
        assert eval_summary.main([str(docs / "quality-paired-m.json"), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "Key results stay." in text and "markers.\n" in text and text.count(f"\n{START}\n") == 1


def test_where_the_document_is_refused(docs, tmp_path, capsys):
    report_json = str(docs / "quality-paired-m.json")
    (tmp_path / "dir.md").mkdir()
    ro = docs / "readonly.md"
    ro.write_text("# read only\n")
    ro.chmod(0o444)
    cases = [([report_json, "--doc", report_json], "is not a markdown document"),
             ([report_json, "--doc", str(docs / "quality.txt")], "is not a markdown document"),
             ([report_json, "--doc", str(tmp_path / "dir.md")], "exists and is not a file"),
             ([report_json, report_json, "--doc", str(docs / "quality.md")], "given twice")]
    if os.geteuid() != 0:  # root writes anyway
        cases.append(([report_json, "--doc", str(ro)], "is not writable"))
    for argv, message in cases:
        assert _code(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert json.loads((docs / "quality-paired-m.json").read_text())["matched_speed"]
    assert not (docs / "quality.txt").exists()


def test_a_new_document_gets_the_summarys_own_title(docs):
    doc = docs / "new" / "summary.md"
    assert eval_summary.main([str(docs / "quality-paired-m.json"), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith(summary.NEW_DOC_HEAD + "\n\n" + START + "\n")
    assert report.DOC_INTRO not in text and text.count("| m | 1024 |") == 1


def test_a_symlinked_document_is_updated_where_it_lives(docs):
    link = docs / "link.md"
    link.symlink_to(docs / "quality.md")
    assert eval_summary.main([str(docs / "quality-paired-m.json"), "--doc", str(link)]) == 0
    assert link.is_symlink() and START in (docs / "quality.md").read_text()


def test_loss_spans_are_runs_of_consecutive_speedups():
    cells = [{"speedup": s, "retrieval": {"verdict": v}}
             for s, v in [(1.02, "loses"), (1.05, "loses"), (1.1, "inconclusive"), (1.15, "loses"), (1.2, None)]]
    cells[-1]["retrieval"] = None  # a metric the report could not compare at that speedup
    assert summary.loss_spans(cells, "retrieval") == ["1.02–1.05x", "1.15x"]


def test_report_text_cannot_break_the_table_or_the_markers(docs):
    data = json.loads((docs / "quality-paired-m.json").read_text())
    data["meta"]["model"] = f"m|x\n{END}"
    (docs / "odd.json").write_text(json.dumps(data))
    assert eval_summary.main([str(docs / "odd.json"), "--doc", str(docs / "quality.md")]) == 0
    text = (docs / "quality.md").read_text()
    assert text.count(END) == 1 and "m\\|x &lt;!-- /adaskip-eval" in text


def _huge_integer(d: dict) -> None:
    d["meta"]["model"] = "HUGE"  # replaced by 5000 digits in the file: json refuses to parse such an integer


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["matched_speed"]["1024"][0]["retrieval"]["comparison"]["difference"].update(low=10 ** 400),
     "is malformed"),
    (_huge_integer, "is not readable JSON"),
])
def test_hostile_numbers_exit_2(docs, capsys, edit, message):
    data = json.loads((docs / "quality-paired-m.json").read_text())
    edit(data)
    path = docs / "hostile.json"
    path.write_text(json.dumps(data).replace('"HUGE"', "9" * 5000))
    before = (docs / "quality.md").read_text()
    assert _code([str(path), "--doc", str(docs / "quality.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and (docs / "quality.md").read_text() == before


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
    _summarize_fuzzed(docs, capsys, data)


def _summarize_fuzzed(docs, capsys, data) -> None:
    """Summarize `data` as a report: a table (one generated block) or exit 2 with one line and the document as it
    was; never a traceback."""
    path = docs / "fuzz.json"
    path.write_text(json.dumps(data))
    before = (docs / "quality.md").read_text()
    code = _code([str(path), "--doc", str(docs / "quality.md")])
    err = capsys.readouterr().err.strip()
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert len(err.splitlines()) == 1 and (docs / "quality.md").read_text() == before
    else:
        assert (docs / "quality.md").read_text().count(START) == 1


def _paths(node, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON value (the root included) as a key path."""
    out = [prefix]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        out += _paths(v, prefix + (k,))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_valid_report_with_one_value_replaced_gets_a_table_or_one_line(docs, capsys, data):
    """The mutations the plain fuzz rarely reaches: a real report, one value (a verdict, a speedup, a K, a whole
    cell...) replaced by arbitrary JSON."""
    report_data = json.loads((docs / "quality-paired-m.json").read_text())
    report_data = {k: report_data[k] for k in ("meta", "matched_speed", "per_context")}
    where = data.draw(st.sampled_from([p for p in _paths(report_data) if p]))
    node = report_data
    for k in where[:-1]:
        node = node[k]
    node[where[-1]] = data.draw(JSON)
    _summarize_fuzzed(docs, capsys, report_data)


def test_adaskip_eval_checks_its_document_before_evaluating(tmp_path, capsys):
    """A --doc whose section markers are broken fails at once (exit 2, one line), before any model is loaded or any
    record written, not after hours of evaluation."""
    from adaskip.cli import eval as eval_cli
    doc = tmp_path / "quality.md"
    doc.write_text("# Q\n\n<!-- adaskip-eval: smollm2-135m -->\nno end marker\n")
    before = doc.read_text()
    try:
        code = eval_cli.main(["--model", "smollm2-135m", "--out", str(tmp_path / "out"), "--doc", str(doc)])
    except SystemExit as e:
        code = int(e.code)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "markers are broken" in err and len(err.splitlines()) == 1
    assert doc.read_text() == before and not (tmp_path / "out").exists()
