"""Several evaluation reports' matched-speed verdicts in one table (adaskip-eval-summary).

Each `adaskip-eval --doc` run leaves its numbers beside the document (`<doc>-<model>.json`). This module reads such
files and, per model, prompt length and skipping phase, lists the AdaSkip selection the run evaluated, the baselines
it ran, and the run's own paired verdicts at every matched ideal speedup up to a limit, consecutive speedups with
the same two configurations and verdict merged into one span. Nothing is recomputed: the verdicts are the reports'
(adaskip/eval/report.py's matched_speed), so the table cannot disagree with the reports it links.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from adaskip.errors import InputError
from adaskip.eval.report import (BASELINES, COMPARED, TARGET_SPEEDUP, delta_text, fmt, merge_section,
                                 read_document, write_text)
from adaskip.plan import MODES

SECTION = "matched-speed"  # the marker name of the generated block in the target document
COLUMN_TITLES = {"retrieval": "retrieval (exact match)", "rougeL": "ROUGE-L", "kl": "KL"}


def load(path: Path) -> dict[str, Any]:
    """One report's data; bad input (missing, not JSON, not a report) is an InputError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"report data {path} does not exist") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError, ...
        raise InputError(f"report data {path} is not readable JSON ({type(e).__name__})") from None
    ok = (isinstance(data, dict) and isinstance(data.get("meta"), dict) and isinstance(data["meta"].get("model"), str)
          and isinstance(data.get("matched_speed"), dict) and isinstance(data.get("per_context"), list))
    if not ok:
        raise InputError(f"report data {path} is not an adaskip-eval report (no meta.model, matched_speed or "
                         "per_context)")
    return data


def _configs(data: dict[str, Any], context: str, mode: str) -> tuple[list[str], list[str]]:
    """The AdaSkip methods and the baselines (`early-exit K=4,6,8`) a report evaluated at one context and mode."""
    rows = [r for r in data["per_context"] if str(r.get("context")) == context and r.get("mode") == mode]
    ours = sorted({r["method"] for r in rows if str(r["method"]).startswith("adaskip")})
    base = {b: sorted(r["k"] for r in rows if r["method"] == b) for b in BASELINES}
    return ours, [f"{b} K={','.join(map(str, ks))}" for b, ks in base.items() if ks]


def _span(speeds: list[float]) -> str:
    return f"{speeds[0]:.2f}x" if len(speeds) == 1 else f"{speeds[0]:.2f}–{speeds[-1]:.2f}x"


def cell(text: str) -> str:
    """Text from a report made safe for one table cell: no column breaks, no line breaks, no HTML comment (a name
    holding a section marker must not become one)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\r", " ").replace("\n", " ")


def _cell_text(c: dict[str, Any], col: str, name_method: bool) -> str:
    """Retrieval: both configurations, Δ with its interval and p (the column users choose by); ROUGE-L and KL: the
    two values (the linked report has the rest)."""
    unit = "%" if col == "retrieval" else ""
    if col != "retrieval":
        return f"{fmt(c['comparison']['ours'], col)} vs {fmt(c['comparison']['theirs'], col)}"
    ours = f"{c['ours_method']} K={c['ours_k']}" if name_method else f"K={c['ours_k']}"
    return (f"{fmt(c['comparison']['ours'], col)}{unit} ({ours}) vs {fmt(c['comparison']['theirs'], col)}"
            f"{unit} ({c['baseline']} K={c['baseline_k']}), {delta_text(c['comparison']['difference'], col)}, "
            f"p={c['comparison']['p_value']:.2g}")


def verdict_spans(cells: list[dict[str, Any]], col: str, name_method: bool = False) -> str:
    """`**loses** at 1.02–1.10x: 58% (K=4) vs 69% (early-exit K=6), Δ ...; inconclusive at 1.15x: ...`: the
    matched cells (sorted by speedup) with consecutive ones of the same verdict and configurations merged."""
    groups: list[tuple[tuple, list[float], dict[str, Any]]] = []
    for v in cells:
        c = v.get(col)
        if c is None:
            continue
        key = (c["verdict"], c["ours_method"], c["ours_k"], c["baseline"], c["baseline_k"])
        if groups and groups[-1][0] == key:
            groups[-1][1].append(v["speedup"])
        else:
            groups.append((key, [v["speedup"]], c))
    parts = []
    for (verdict, *_), speeds, c in groups:
        shown = f"**{verdict}**" if verdict in ("beats", "loses") else verdict
        parts.append(f"{shown} at {_span(speeds)}: {_cell_text(c, col, name_method)}")
    return "; ".join(parts) or "–"


def loss_spans(cells: list[dict[str, Any]], col: str) -> list[str]:
    """The speedups (sorted cells) where `col` loses, as runs of consecutive compared speedups: ['1.02–1.05x',
    '1.15x'] when 1.10x in between did not lose."""
    runs: list[list[float]] = []
    previous_lost = False
    for v in cells:
        lost = (v.get(col) or {}).get("verdict") == "loses"
        if lost:
            if previous_lost:
                runs[-1].append(v["speedup"])
            else:
                runs.append([v["speedup"]])
        previous_lost = lost
    return [_span(r) for r in runs]


def summary_rows(data: dict[str, Any], link: str, up_to: float = TARGET_SPEEDUP) -> list[dict[str, Any]]:
    """One row per (context, mode) of a report that has matched-speed cells up to `up_to`."""
    out = []
    for context, cells in sorted(data["matched_speed"].items(), key=lambda kv: int(kv[0])):
        for mode in MODES:
            here = sorted((v for v in cells if v.get("mode") == mode and v["speedup"] <= up_to + 1e-9),
                          key=lambda v: v["speedup"])
            if not here:
                continue
            ours, theirs = _configs(data, context, mode)
            several = len(ours) > 1  # more than one AdaSkip variant: name the one each span compares
            losses = [f"{col} at {', '.join(spans)}" for col in COMPARED if (spans := loss_spans(here, col))]
            out.append({"model": data["meta"]["model"], "context": int(context), "mode": mode, "selection": ", ".join(f"`{m}`" for m in ours) or "–",
                        "baselines": "; ".join(theirs) or "–", "target": "yes" if not losses else "**no**: " + "; ".join(losses),
                        **{col: verdict_spans(here, col, several) for col in COMPARED}, "report": link})
    return out


def render_section(reports: list[tuple[Path, dict[str, Any]]], doc: Path, up_to: float = TARGET_SPEEDUP) -> str:
    """The generated section: the table of every report's matched-speed rows, and where each came from."""
    rows = []
    for path, data in reports:
        try:  # a report edited by hand or by a hostile hand: one line naming it, not a traceback
            target = path.parent / data["meta"].get("doc", "quality.md")
            link = f"[{target.stem}]({Path(os.path.relpath(target, doc.parent)).as_posix()})"
            rows += summary_rows(data, link, up_to)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
            raise InputError(f"report data {path} is malformed ({type(e).__name__}: {e})") from None
    if not rows:
        raise InputError(f"none of the {len(reports)} reports has a matched-speed comparison up to {up_to}x")
    rows.sort(key=lambda r: (r["model"], r["context"], MODES.index(r["mode"]), r["selection"]))
    sources = ", ".join(f"`{Path(os.path.relpath(p, doc.parent)).as_posix()}`" for p, _ in reports)
    lines = [f"### Matched-speed verdicts up to {up_to:g}x (generated)", "",
             f"Written by `adaskip-eval-summary` from the data of the paired reports ({sources}). Per model, prompt "
             "length and phase: the AdaSkip selection the report evaluated against the baselines it ran (K = "
             "sublayers; a baseline's K/2 whole layers), at every matched ideal speedup up to "
             f"{up_to:g}x that both reach, the best AdaSkip configuration vs the best baseline configuration on "
             "the same questions / documents (the report's verdicts, spans of consecutive speedups with the same "
             "two configurations merged; Δ = AdaSkip - baseline with its 95% interval, p of the paired test). "
             "**target**: no **loses** at any of those speedups.", "",
             "| model | prompt | phase | AdaSkip selection | baselines run | target | "
             + " | ".join(COLUMN_TITLES[c] for c in COMPARED) + " | report |",
             "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in COMPARED) + " | --- |"]
    for r in rows:
        lines.append("| " + " | ".join(cell(t) for t in [r["model"], str(r["context"]), r["mode"], r["selection"],
                                                          r["baselines"], r["target"]]
                                       + [r[c] for c in COMPARED] + [r["report"]]) + " |")
    return "\n".join(lines) + "\n"


def write_summary(paths: list[Path], doc: Path, up_to: float = TARGET_SPEEDUP) -> str:
    """Render the reports at `paths` into `doc`'s generated block (appended when the document has none; the rest
    of the document is kept). Returns the section. Nothing is written unless every report and the document are
    usable."""
    if doc.suffix.lower() != ".md":
        raise InputError(f"--doc {doc} is not a markdown document (.md)")
    target = doc.resolve()  # a symlinked document is updated where it lives
    resolved = [p.resolve() for p in paths]
    if target in resolved:
        raise InputError(f"--doc {doc} is one of the reports")
    if len(set(resolved)) != len(resolved):
        raise InputError("a report is given twice")
    if target.exists() and not os.access(target, os.W_OK):
        raise InputError(f"--doc {doc} is not writable")
    section = render_section([(p, load(p)) for p in paths], doc, up_to)
    merged = merge_section(read_document(target), SECTION, section, replace_unmarked=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text(target, merged)
    return section
