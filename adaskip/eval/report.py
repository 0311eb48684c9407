"""Tables (markdown + JSON), a plot and the quality document from an evaluation's records."""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from adaskip.plan import MODES
from adaskip.eval import metrics

RETRIEVAL = ("passkey", "multikey", "kv")
BASELINES = ("early-exit", "skipdecode", "unified")
COLUMNS = ("passkey", "multikey", "kv", "retrieval", "rougeL", "ppl", "kl")
HIGHER_BETTER = {"passkey": True, "multikey": True, "kv": True, "retrieval": True, "rougeL": True, "ppl": False,
                 "kl": False}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def aggregate(records: list[dict[str, Any]], by_context: bool = False) -> list[dict[str, Any]]:
    """One row per (method, K, mode[, context]) with every metric pooled over its samples and contexts."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["task"] == "done":
            continue
        key = (r["method"], r["k"], r["mode"]) + ((r["context"],) if by_context else ())
        groups[key].append(r)
    rows = []
    for key, recs in groups.items():
        row: dict[str, Any] = {"method": key[0], "k": key[1], "mode": key[2]}
        if by_context:
            row["context"] = key[3]
        row["skipped"] = recs[0]["skipped"]
        row["contexts"] = sorted({r["context"] for r in recs})
        for t in RETRIEVAL:
            scores = [r["score"] for r in recs if r["task"] == t]
            row[t], row[f"{t}_n"] = metrics.mean(scores), len(scores)
        ret = [r["score"] for r in recs if r["task"] in RETRIEVAL]
        row["retrieval"], row["retrieval_n"] = metrics.mean(ret), len(ret)
        summ = [r["score"] for r in recs if r["task"] == "summary"]
        row["rougeL"], row["rougeL_n"] = metrics.mean(summ), len(summ)
        nll = [x for r in recs if r["task"] == "lm" for x in r["nll"]]
        kl = [x for r in recs if r["task"] == "lm" for x in r["kl"]]
        row["ppl"] = metrics.perplexity(nll) if nll else math.nan
        row["kl"], row["lm_tokens"] = metrics.mean(kl), len(kl)
        sp = [r["speedup"] for r in recs if r.get("speedup")]
        row["ideal_prefill"] = metrics.mean([s["prefill"] for s in sp])
        row["ideal_decode"] = metrics.mean([s["decode"] for s in sp])
        rows.append(row)
    order = {m: i for i, m in enumerate(MODES)}
    rows.sort(key=lambda r: (r.get("context", 0), r["k"], order.get(r["mode"], 9), _method_rank(r["method"]),
                             r["method"]))
    return rows


def _method_rank(m: str) -> int:
    if m == "full":
        return 0
    if m in BASELINES:
        return 1 + BASELINES.index(m)
    return 10 if m == "adaskip" else 11 if m == "adaskip-best" else 12


def _fmt(v: Any, col: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if col in RETRIEVAL or col == "retrieval":
        return f"{100 * v:.0f}"
    if col == "rougeL":
        return f"{v:.3f}"
    if col == "ppl":
        return f"{v:.2f}"
    if col == "kl":
        return f"{v:.4f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], with_context: bool = False) -> str:
    head = (["context"] if with_context else []) + ["K", "mode", "method", "skipped", "passkey %", "multikey %",
                                                     "kv %", "retrieval %", "ROUGE-L", "PPL", "KL",
                                                     "ideal prefill x", "ideal decode x"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = ([str(r["context"])] if with_context else []) + [str(r["k"]), r["mode"], _name(r["method"]),
                                                               str(r["skipped"])]
        cells += [_fmt(r[c], c) for c in COLUMNS]
        cells += [f"{r['ideal_prefill']:.3f}" if not math.isnan(r["ideal_prefill"]) else "–",
                  f"{r['ideal_decode']:.3f}" if not math.isnan(r["ideal_decode"]) else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _name(m: str) -> str:
    return f"**{m}**" if m in ("adaskip", "adaskip-best") else m


def verdicts(rows: list[dict[str, Any]], ours: str) -> list[dict[str, Any]]:
    """Per (K, mode) with baselines: `ours` vs the best baseline on retrieval accuracy, ROUGE-L and KL."""
    out = []
    by = defaultdict(dict)
    for r in rows:
        by[(r["k"], r["mode"])][r["method"]] = r
    for (k, mode), ms in sorted(by.items(), key=lambda x: (x[0][0], MODES.index(x[0][1]))):
        base = [ms[b] for b in BASELINES if b in ms]
        if ours not in ms or not base:
            continue
        o = ms[ours]
        v: dict[str, Any] = {"k": k, "mode": mode, "ours": ours}
        for col in ("retrieval", "rougeL", "kl"):
            vals = [(b[col], b["method"]) for b in base if not math.isnan(b[col])]
            if not vals or math.isnan(o[col]):
                continue
            best, who = (max if HIGHER_BETTER[col] else min)(vals)
            ok = o[col] >= best - 1e-9 if HIGHER_BETTER[col] else o[col] <= best + 1e-9
            v[col] = {"ours": o[col], "best_baseline": best, "baseline": who, "ok": ok}
        out.append(v)
    return out


def verdict_table(vs: list[dict[str, Any]]) -> str:
    lines = ["| K | mode | retrieval % (ours / best baseline) | ROUGE-L (ours / best baseline) | "
             "KL (ours / best baseline) |", "| --- | --- | --- | --- | --- |"]
    for v in vs:
        cells = [str(v["k"]), v["mode"]]
        for col in ("retrieval", "rougeL", "kl"):
            c = v.get(col)
            if c is None:
                cells.append("–")
                continue
            mark = "✅" if c["ok"] else "❌"
            cells.append(f"{mark} {_fmt(c['ours'], col)} / {_fmt(c['best_baseline'], col)} ({c['baseline']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_table(study: dict[str, Any]) -> str:
    budgets = [str(k) for k in study["budgets"]]
    lines = ["| stand-in / selection | " + " | ".join(f"K={k}" for k in budgets) + " | mean |",
             "|" + " --- |" * (len(budgets) + 2)]
    for name, vals in study["kl"].items():
        mean = metrics.mean([vals[k] for k in budgets])
        best = "**" if name == "/".join(study["best"]) else ""
        lines.append(f"| {best}{name}{best} | " + " | ".join(f"{vals[k]:.4f}" for k in budgets) + f" | {mean:.4f} |")
    return "\n".join(lines)


def decode_steps(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Task -> the decode steps its records' ideal decode speedups average over (records that say so)."""
    out: dict[str, set[int]] = defaultdict(set)
    for r in records:
        if (r.get("speedup") or {}).get("decode_steps"):
            out[r["task"]].add(r["speedup"]["decode_steps"])
    return {t: sorted(v) for t, v in sorted(out.items())}


def _steps_note(data: dict[str, Any]) -> str:
    steps = data.get("decode_steps")
    if not steps:
        return ""
    each = ", ".join(f"{t} {'/'.join(map(str, v))}" for t, v in steps.items())
    return (f"; decode: over each generation's own decode steps ({each}), 1 / the mean per-step FLOP fraction "
            f"(only SkipDecode's set changes with the step)")


def _documents(per_context: list[dict[str, Any]]) -> str:
    """'1024: 2, 2048: 1' — documents per task at each context, from the full model's rows."""
    out = []
    for r in per_context:
        if r["method"] == "full":
            out.append(f"{r['context']}: {max(r['passkey_n'], r['rougeL_n'])}")
    return ", ".join(out) or "–"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    cols = [("retrieval", "retrieval accuracy"), ("rougeL", "ROUGE-L vs full"), ("kl", "next-token KL vs full")]
    fig, axes = plt.subplots(len(cols), len(modes), figsize=(4.2 * len(modes), 3.0 * len(cols)), dpi=100,
                             squeeze=False)
    methods = sorted({r["method"] for r in rows if r["method"] != "full"}, key=lambda m: (_method_rank(m), m))
    full = {r["mode"]: r for r in rows if r["method"] == "full"}
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}  # one color per method in every panel
    for ci, (col, label) in enumerate(cols):
        for mi, mode in enumerate(modes):
            ax = axes[ci][mi]
            for m in methods:
                pts = sorted((r["k"], r[col]) for r in rows if r["method"] == m and r["mode"] == mode
                             and not math.isnan(r[col]))
                if pts:
                    style = "-o" if m.startswith("adaskip") else "--s"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3.5, label=m, color=colors[m])
            ref = next(iter(full.values()), None)
            if ref is not None and not math.isnan(ref[col]) and col != "kl":
                ax.axhline(ref[col], color="gray", lw=0.8, ls=":", label="full model")
            ax.set_title(f"{mode}: {label}", fontsize=9)
            ax.set_xlabel("budget K (sublayers)", fontsize=8)
            if col == "kl":
                ax.set_yscale("symlog", linthresh=1e-2)
            ax.grid(alpha=0.3)
    legend: dict[str, Any] = {}  # every method of any panel (some run in some modes only)
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(lab, h)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path)
    plt.close(fig)


def write_outputs(records: list[dict[str, Any]], out: Path, meta: dict[str, Any], study: dict[str, Any] | None,
                  doc: Path | None = None, notes: str = "") -> dict[str, Any]:
    """quality.md / quality.json / quality.png into `out` (and the document at `doc`, its plot beside it)."""
    rows = aggregate(records)
    per_context = aggregate(records, by_context=True)
    ours = "adaskip-best" if any(r["method"] == "adaskip-best" for r in rows) else "adaskip"
    contexts = sorted({r["context"] for r in per_context})
    vs = {c: verdicts([r for r in per_context if r["context"] == c], ours) for c in contexts}
    paper = {c: verdicts([r for r in per_context if r["context"] == c], "adaskip") for c in contexts} \
        if ours != "adaskip" else {}
    data = {"meta": meta, "study": study, "rows": rows, "per_context": per_context, "verdicts": vs,
            "verdicts_paper_rule": paper, "ours": ours, "decode_steps": decode_steps(records)}
    _write(out / "quality.json", json.dumps(data, indent=1))
    # the plot shows the context with the most rows (contexts may cover different budgets)
    shown = max(contexts, key=lambda c: (sum(r["context"] == c for r in per_context), -c)) if contexts else 0
    data["plot_context"] = shown
    plotted = [r for r in per_context if r["context"] == shown]
    title = f"{meta.get('model', 'model')}: quality at equal budget, {shown}-token prompts"
    plot(plotted, out / "quality.png", title)
    _write(out / "quality.md", render(data, "quality.png", notes))
    if doc is not None:
        doc.parent.mkdir(parents=True, exist_ok=True)
        png = doc.with_name(f"{doc.stem}-{_slug(meta.get('model', 'model'))}.png")
        plot(plotted, png, title)
        old = doc.read_text(encoding="utf-8") if doc.is_file() else ""
        _write(doc, merge_section(old, meta.get("model", "model"), render(data, png.name, notes, depth=2)))
    return data


DOC_TITLE = "# Quality at equal budget"
DOC_INTRO = ("Generated by `adaskip-eval` (adaskip/eval/), one section per model. `adaskip-eval --doc` rewrites "
             "its model's section and keeps the others.")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def merge_section(doc: str, model: str, section: str) -> str:
    """The document with `model`'s section replaced by `section` (appended when new). A document without section
    markers (an older single-model report) is replaced."""
    begin, end = f"<!-- adaskip-eval: {model} -->", f"<!-- /adaskip-eval: {model} -->"
    block = f"{begin}\n{section.strip()}\n{end}"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    if "<!-- adaskip-eval: " not in doc:
        return f"{DOC_TITLE}\n\n{DOC_INTRO}\n\n{block}\n"
    return doc.rstrip("\n") + f"\n\n{block}\n"


def render(data: dict[str, Any], png: str, notes: str, depth: int = 1) -> str:
    """The report; `depth` 2 nests it as one model's section of a larger document (every heading one level down)."""
    meta, study = data["meta"], data["study"]
    o = meta["options"]
    h1, h2, h3 = ("#" * (depth + n) for n in range(3))
    lines = [f"{h1} {'Quality at equal budget: ' if depth == 1 else ''}{meta['model']}", "",
             "Generated by `adaskip-eval` (adaskip/eval/). Commands that produced these records:", ""]
    lines += [f"    {c}" for c in meta.get("commands", [])]
    lines += ["",
              f"{h2} Setup", "",
              f"* Model `{meta['model']}` ({meta['layers']} layers = {2 * meta['layers']} sublayers), fp32 reference "
              f"torch engine, greedy decoding; every method runs through the same engine, Generator and SkipPolicy.",
              f"* Offline importance (one calibration, reused by every AdaSkip row): {o['calib_prompts']} prompts x "
              f"{o['calib_tokens']} tokens of the built-in corpus (CPython `pydoc_data`, PSF License); the "
              f"`task-calib` ablation calibrates on the tasks' own prompts (held-out seeds) instead.",
              f"* Contexts {', '.join(map(str, meta['contexts']))} tokens; documents per task: "
              f"{_documents(data['per_context'])} (seed {o['seed']}). Documents come from a corpus region no "
              f"calibration window touches.",
              f"* Retrieval (exact match of the generated answer, "
              f"{'chat template' if meta.get('chat_prompts', True) else 'plain-text prompts'}, answer-prefixed "
              f"prompts): "
              "`passkey` (one 5-digit key), `multikey` (4 needles, each asked), `kv` (a JSON object of 4 pairs, 3 "
              "asked). Ceiling: the `full` rows.",
              f"* Summary: {o['summary_tokens']} greedy tokens, ROUGE-L against the full model's own summary "
              f"(fidelity). LM: the document's last {o['lm_tokens']} real tokens teacher-forced through the policy's "
              "decode steps: perplexity and next-token KL(full || method), in nats.",
              f"* Equal budget: AdaSkip skips K sublayers, baselines k = K/2 whole layers; an odd K has no "
              f"whole-layer equivalent, so those rows are AdaSkip-only. `skipped` is the number of sublayers a "
              f"plan really skips (Unified Skipping's rule can skip more than k layers). Online window W = "
              f"{o['window']}. Ideal speedups: FLOP model at the context length (adaskip/cost.py){_steps_note(data)}.",
              ""]
    if study:
        best = " + ".join(study["best"])
        lines += [f"{h2} Stand-ins for skipped sublayers (held-out text)", "",
                  f"Mean next-token KL from the full model over {study['windows']} held-out windows of "
                  f"{study['tokens']} tokens (prefill mode, every position). `norm-ratio` is the paper's rule "
                  f"(reference); the winner (bold) is `adaskip-best`: **{best}**.", "", study_table(study), ""]
    main = ("full", "adaskip", "adaskip-best") + BASELINES
    for c in sorted({r["context"] for r in data["per_context"]}):
        rows_c = [r for r in data["per_context"] if r["context"] == c]
        lines += [f"{h2} Results at {c} tokens", "", markdown_table([r for r in rows_c if r["method"] in main
                                                                    or r["method"].startswith("engine:")]), ""]
        ablations = [r for r in rows_c if r["method"] not in main and not r["method"].startswith("engine:")]
        if ablations:
            keys = {(r["k"], r["mode"]) for r in ablations}
            ref = [r for r in rows_c if r["method"] in ("adaskip", "adaskip-best") and (r["k"], r["mode"]) in keys]
            lines += [f"{h3} Ablations at {c} tokens", "",
                      "`attn` / `ffn`: AdaSkip ranking restricted to one kind; `no-online`: no online decode step; "
                      "`task-calib`: offline importance from the tasks' own prompts instead of the built-in corpus "
                      "(the paper's same-task vs historical importance); `channel-affine`: the per-channel stand-in "
                      "with the paper's similarity ranking. AdaSkip rows at the same budgets repeated for reference.",
                      "", markdown_table(sorted(ablations + ref, key=lambda r: (r["k"], MODES.index(r["mode"]),
                                                                               _method_rank(r["method"]),
                                                                               r["method"]))), ""]
        if data["verdicts"].get(c):
            lines += [f"{h3} {data['ours']} vs the best baseline at equal budget ({c} tokens)", "",
                      "✅: at least as good as the best of early-exit / skipdecode / unified; ❌: worse.", "",
                      verdict_table(data["verdicts"][c]), ""]
        if data["verdicts_paper_rule"].get(c):
            lines += [f"{h3} The paper's rule (adaskip) vs the best baseline ({c} tokens)", "",
                      verdict_table(data["verdicts_paper_rule"][c]), ""]
    lines += [f"![quality]({png})", "", f"The plot shows the {data.get('plot_context')}-token prompts.", ""]
    if notes.strip():  # the notes' own headings move down with the report's
        lines += ["\n".join("#" * (depth - 1) + ln if ln.startswith("#") else ln for ln in notes.strip().splitlines()),
                  ""]
    return "\n".join(lines)
