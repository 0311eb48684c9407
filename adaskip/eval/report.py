"""Tables (markdown + JSON), plots and the quality document from an evaluation's records: every rate and mean with
its 95% interval, paired verdicts against the best baseline at equal K and at matched ideal speedup, and the
quality-vs-speedup frontier (the statistics: adaskip/eval/stats.py)."""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from adaskip.errors import InputError
from adaskip.plan import MODES
from adaskip.eval import metrics, stats

RETRIEVAL = ("passkey", "multikey", "kv")
BASELINES = ("early-exit", "skipdecode", "unified")
COLUMNS = ("passkey", "multikey", "kv", "retrieval", "rougeL", "ppl", "kl")
HIGHER_BETTER = {"passkey": True, "multikey": True, "kv": True, "retrieval": True, "rougeL": True, "ppl": False,
                 "kl": False}
COMPARED = ("retrieval", "rougeL", "kl")  # the metrics of every comparison (retrieval: exact match, paired exact)
# a difference inside +-margin is too small to matter: an interval inside it is a tie (retrieval: 5 points of
# accuracy; ROUGE-L: 0.05; KL: 0.05 nats)
MARGINS = {"retrieval": 0.05, "rougeL": 0.05, "kl": 0.05}
# matched-speedup comparisons at these ideal speedups (those some configuration reaches)
SPEED_TARGETS = (1.02, 1.05, 1.1, 1.15, 1.2, 1.3, 1.5)


def read_document(doc: Path) -> str:
    """The text of a document a report is merged into ("" when it does not exist yet); anything else that is not
    UTF-8 text an InputError (overwriting it would lose it)."""
    if not doc.exists():
        return ""
    if not doc.is_file():
        raise InputError(f"--doc {doc} exists and is not a file")
    try:
        return doc.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--doc {doc} is not UTF-8 text: not overwriting it") from None
    except OSError as e:
        raise InputError(f"--doc {doc} cannot be read ({e.strerror})") from None


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
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
        # 95% intervals: exact binomial over questions; bootstrap over documents (a document's tokens move together)
        ci = stats.proportion_ci(int(round(sum(ret))), len(ret))
        row["retrieval_ci"] = [ci.low, ci.high]
        row["rougeL_ci"] = _ci(stats.mean_ci(summ))
        row["kl_ci"] = _ci(stats.mean_ci([metrics.mean(r["kl"]) for r in recs if r["task"] == "lm"]))
        row["documents"] = len({r["sample"] for r in recs})
        sp = [r["speedup"] for r in recs if r.get("speedup")]
        row["ideal_prefill"] = metrics.mean([s["prefill"] for s in sp])
        row["ideal_decode"] = metrics.mean([s["decode"] for s in sp])
        rows.append(row)
    order = {m: i for i, m in enumerate(MODES)}
    rows.sort(key=lambda r: (r.get("context", 0), r["k"], order.get(r["mode"], 9), _method_rank(r["method"]),
                             r["method"]))
    return rows


def _ci(interval: stats.Interval) -> list[float]:
    return [interval.low, interval.high]


def unit_values(records: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[str, float]]]:
    """(method, K, mode, context) -> metric -> unit -> value, the paired comparisons' data. A unit is one question
    (retrieval exact match), one summary (ROUGE-L) or one document's mean next-token KL, named by its document and
    query, so every method's value for the same question has the same name."""
    out: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: {c: {} for c in COMPARED})
    for r in records:
        key = (r["method"], r["k"], r["mode"], r["context"])
        unit = "|".join(r["id"].split("|")[-2:])  # <document>|<query>
        if r["task"] in RETRIEVAL:
            out[key]["retrieval"][unit] = float(r["score"])
        elif r["task"] == "summary":
            out[key]["rougeL"][unit] = float(r["score"])
        elif r["task"] == "lm":
            out[key]["kl"][unit] = metrics.mean(r["kl"])
    return dict(out)


def compare(ours: dict[str, float], theirs: dict[str, float], col: str) -> stats.Comparison:
    """ours vs theirs on the units both have (a paired comparison)."""
    units = sorted(set(ours) & set(theirs))
    a, b = [ours[u] for u in units], [theirs[u] for u in units]
    if col == "retrieval":
        return stats.compare_binary(a, b, margin=MARGINS[col])
    return stats.compare_continuous(a, b, HIGHER_BETTER[col], MARGINS[col])


def speed(row: dict[str, Any]) -> float:
    """The ideal speedup a row's mode buys: prefill mode its prefill's, decode mode its decode steps', e2e the
    smaller of the two (it must hold for both phases)."""
    if row["mode"] == "prefill":
        return row["ideal_prefill"]
    if row["mode"] == "decode":
        return row["ideal_decode"]
    return min(row["ideal_prefill"], row["ideal_decode"])


def _method_rank(m: str) -> int:
    if m == "full":
        return 0
    if m in BASELINES:
        return 1 + BASELINES.index(m)
    return 10 if m == "adaskip" else 11 if m == "adaskip-best" else 12


def fmt(v: Any, col: str) -> str:
    """A metric as the tables print it: retrieval in percent, ROUGE-L 3 decimals, KL 4."""
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


def _with_ci(r: dict[str, Any], col: str) -> str:
    """`69 (59–77)`: the estimate and its 95% interval, when the row has one."""
    text = fmt(r[col], col)
    low, high = r.get(f"{col}_ci", [math.nan, math.nan])
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return text
    return f"{text} ({fmt(low, col)}–{fmt(high, col)})"


def markdown_table(rows: list[dict[str, Any]], with_context: bool = False) -> str:
    head = (["context"] if with_context else []) + ["K", "mode", "method", "skipped", "passkey %", "multikey %",
                                                     "kv %", "retrieval % (95% CI)", "n", "ROUGE-L (95% CI)",
                                                     "PPL", "KL (95% CI)", "ideal prefill x", "ideal decode x"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = ([str(r["context"])] if with_context else []) + [str(r["k"]), r["mode"], _name(r["method"]),
                                                               str(r["skipped"])]
        cells += [fmt(r[c], c) for c in RETRIEVAL]
        cells += [_with_ci(r, "retrieval"), str(r.get("retrieval_n", "–")), _with_ci(r, "rougeL"),
                  fmt(r["ppl"], "ppl"), _with_ci(r, "kl")]
        cells += [f"{r['ideal_prefill']:.3f}" if not math.isnan(r["ideal_prefill"]) else "–",
                  f"{r['ideal_decode']:.3f}" if not math.isnan(r["ideal_decode"]) else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _name(m: str) -> str:
    return f"**{m}**" if m in ("adaskip", "adaskip-best") else m


def _best(cands: list[dict[str, Any]], col: str) -> dict[str, Any] | None:
    """The candidate with the best point estimate of `col` (ties: the first)."""
    ok = [c for c in cands if not math.isnan(c[col])]
    if not ok:
        return None
    sign = 1 if HIGHER_BETTER[col] else -1
    return max(ok, key=lambda c: sign * c[col])


def _cell(o: dict[str, Any], b: dict[str, Any], col: str, units: dict[tuple, dict[str, dict[str, float]]]) \
        -> dict[str, Any]:
    def key(r: dict[str, Any]) -> tuple:
        return (r["method"], r["k"], r["mode"], r["context"])

    c = compare(units.get(key(o), {}).get(col, {}), units.get(key(b), {}).get(col, {}), col)
    return {"ours": o[col], "ours_ci": o.get(f"{col}_ci"), "ours_method": o["method"], "ours_k": o["k"],
            "best_baseline": b[col], "baseline_ci": b.get(f"{col}_ci"), "baseline": b["method"], "baseline_k": b["k"],
            "comparison": c.to_dict(), "verdict": c.verdict,
            "ok": c.verdict != "loses"}  # not shown worse at 95% (beats, ties or inconclusive)


def verdicts(rows: list[dict[str, Any]], ours: str, units: dict[tuple, dict[str, dict[str, float]]] | None = None) \
        -> list[dict[str, Any]]:
    """Per (K, mode) with baselines: `ours` vs the best baseline (best point estimate) on retrieval, ROUGE-L and KL,
    each a paired comparison on the same questions / documents (`units`: unit_values of the records; rows are one
    context's)."""
    units = units or {}
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
        for col in COMPARED:
            b = _best(base, col)
            if b is None or math.isnan(o[col]):
                continue
            v[col] = _cell(o, b, col, units)
        out.append(v)
    return out


def matched_speed(rows: list[dict[str, Any]], units: dict[tuple, dict[str, dict[str, float]]],
                  targets: tuple[float, ...] = SPEED_TARGETS) -> list[dict[str, Any]]:
    """Per mode and ideal-speedup target s: the best AdaSkip configuration (any variant, any K) with speed >= s
    against the best baseline configuration with speed >= s, per metric, paired on the same units (rows: one
    context's). Targets that no baseline or no AdaSkip configuration reaches are left out."""
    out = []
    for mode in MODES:
        here = [r for r in rows if r["mode"] == mode and r["method"] != "full" and not r["method"].startswith("engine:")
                and not math.isnan(speed(r))]
        for s in targets:
            fast = [r for r in here if speed(r) >= s - 1e-9]
            ours = [r for r in fast if r["method"].startswith("adaskip")]
            base = [r for r in fast if r["method"] in BASELINES]
            if not ours or not base:
                continue
            v: dict[str, Any] = {"mode": mode, "speedup": s}
            for col in COMPARED:
                o, b = _best(ours, col), _best(base, col)
                if o is not None and b is not None:
                    v[col] = _cell(o, b, col, units)
            out.append(v)
    return out


TARGET_SPEEDUP = 1.2  # issue target: no loss vs the best baseline at any matched speedup up to this


def target_misses(matched: list[dict[str, Any]], limit: float = TARGET_SPEEDUP) -> list[str]:
    """The matched-speedup cells up to `limit` where the best AdaSkip configuration loses (at 95%) to the best
    baseline: 'prefill 1.15x retrieval', ..."""
    return [f"{v['mode']} {v['speedup']:.2f}x {col}" for v in matched if v["speedup"] <= limit + 1e-9
            for col in COMPARED if v.get(col, {}).get("verdict") == "loses"]


def signed(v: float, col: str) -> str:
    """A difference of `col` with its sign, in fmt's units."""
    if col == "retrieval":
        return f"{100 * v:+.0f}"
    return f"{v:+.3f}" if col == "rougeL" else f"{v:+.4f}"


def delta_text(d: dict[str, Any], col: str) -> str:
    """`Δ +10 (+4, +10)`: a paired difference with its 95% interval, or why it has none."""
    if math.isnan(d["low"]):
        return f"Δ {signed(d['estimate'], col)}, n={d['n']}: too few for an interval"
    return f"Δ {signed(d['estimate'], col)} ({signed(d['low'], col)}, {signed(d['high'], col)})"


def paired_text(comparison: dict[str, Any], col: str) -> str:
    """A paired comparison's difference with its interval and the test's p: `Δ +10 (+4, +10), p=0.002`."""
    return f"{delta_text(comparison['difference'], col)}, p={comparison['p_value']:.2g}"


def _verdict_cell(c: dict[str, Any] | None, col: str, with_config: bool = False) -> str:
    if c is None:
        return "–"
    ours = f"{c['ours_method']} K={c['ours_k']}: " if with_config else ""
    base = f"{c['baseline']} K={c['baseline_k']}" if with_config else c["baseline"]
    cmp = c["comparison"]  # the paired means: over the units both have (a partly finished run may differ)
    return (f"**{c['verdict']}** {ours}{fmt(cmp['ours'], col)} vs {fmt(cmp['theirs'], col)} ({base}, n={cmp['n']}); "
            f"{paired_text(cmp, col)}")


def verdict_table(vs: list[dict[str, Any]]) -> str:
    lines = ["| K | mode | retrieval % | ROUGE-L | KL |", "| --- | --- | --- | --- | --- |"]
    for v in vs:
        lines.append("| " + " | ".join([str(v["k"]), v["mode"]] + [_verdict_cell(v.get(c), c) for c in COMPARED])
                     + " |")
    return "\n".join(lines)


def matched_table(vs: list[dict[str, Any]]) -> str:
    lines = ["| mode | ideal speedup >= | retrieval % | ROUGE-L | KL |", "| --- | --- | --- | --- | --- |"]
    for v in vs:
        lines.append("| " + " | ".join([v["mode"], f"{v['speedup']:.2f}x"]
                                       + [_verdict_cell(v.get(c), c, with_config=True) for c in COMPARED]) + " |")
    return "\n".join(lines)


def frontier_table(rows: list[dict[str, Any]]) -> str:
    """Every configuration of one context by mode and ideal speedup (the frontier's points)."""
    lines = ["| mode | ideal speedup x | method | K | retrieval % (95% CI) | ROUGE-L (95% CI) | KL (95% CI) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    pts = [r for r in rows if not r["method"].startswith("engine:") and not math.isnan(speed(r))]
    for r in sorted(pts, key=lambda r: (MODES.index(r["mode"]) if r["mode"] in MODES else 9, speed(r),
                                        _method_rank(r["method"]), r["method"], r["k"])):
        lines.append(f"| {r['mode']} | {speed(r):.3f} | {_name(r['method'])} | {r['k']} | {_with_ci(r, 'retrieval')} "
                     f"| {_with_ci(r, 'rougeL')} | {_with_ci(r, 'kl')} |")
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


def _questions(per_context: list[dict[str, Any]]) -> str:
    """'1024: 104, 2048: 104' — retrieval questions per cell at each context, from the full model's rows."""
    return ", ".join(f"{r['context']}: {r['retrieval_n']}" for r in per_context if r["method"] == "full") or "–"


def plotted_modes(rows: list[dict[str, Any]]) -> list[str]:
    """The modes that get a column of panels: those with a skipping row (the full model's row sits in one mode and is
    drawn in every panel as a line, so alone it would give an empty column)."""
    modes = [m for m in MODES if any(r["mode"] == m and r["method"] != "full" for r in rows)]
    return modes or [m for m in MODES if any(r["mode"] == m for r in rows)]


PANEL_METRICS = [("retrieval", "retrieval accuracy"), ("rougeL", "ROUGE-L vs full"), ("kl", "next-token KL vs full")]


def _panel_grid(plt: Any, n_modes: int) -> tuple[Any, Any]:
    """One row of panels per metric, one column per mode; at least 7.5 in wide, room for the title and legend."""
    return plt.subplots(len(PANEL_METRICS), n_modes, figsize=(max(4.2 * n_modes, 7.5), 3.0 * len(PANEL_METRICS)),
                        dpi=100, squeeze=False)


def _finish(plt: Any, fig: Any, axes: Any, title: str, path: Path) -> None:
    """One legend of every method in any panel (some run in some modes only), the title, saved and closed."""
    legend: dict[str, Any] = {}
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(lab, h)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(len(legend), 6), fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path)
    plt.close(fig)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes, cols = plotted_modes(rows), PANEL_METRICS
    fig, axes = _panel_grid(plt, len(modes))
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
    _finish(plt, fig, axes, title, path)


def frontier_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Quality vs ideal speedup per mode (one context's rows): every method's configurations as a line, 95%
    intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes, cols = plotted_modes(rows), PANEL_METRICS
    fig, axes = _panel_grid(plt, len(modes))
    methods = sorted({r["method"] for r in rows if r["method"] != "full" and not r["method"].startswith("engine:")},
                     key=lambda m: (_method_rank(m), m))
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    full = next((r for r in rows if r["method"] == "full"), None)
    for ci, (col, label) in enumerate(cols):
        for mi, mode in enumerate(modes):
            ax = axes[ci][mi]
            for m in methods:
                pts = sorted((speed(r), r[col], *(r.get(f"{col}_ci") or [math.nan, math.nan])) for r in rows
                             if r["method"] == m and r["mode"] == mode and not math.isnan(r[col])
                             and not math.isnan(speed(r)))
                if not pts:
                    continue
                x, y = [p[0] for p in pts], [p[1] for p in pts]
                err = [[max(p[1] - p[2], 0) if not math.isnan(p[2]) else 0 for p in pts],
                       [max(p[3] - p[1], 0) if not math.isnan(p[3]) else 0 for p in pts]]
                style = "-o" if m.startswith("adaskip") else "--s"
                ax.errorbar(x, y, yerr=err, fmt=style, ms=3.5, capsize=2, lw=1, label=m, color=colors[m])
            if full is not None and not math.isnan(full[col]) and col != "kl":
                ax.axhline(full[col], color="gray", lw=0.8, ls=":", label="full model")
            ax.set_title(f"{mode}: {label}", fontsize=9)
            ax.set_xlabel("ideal speedup (FLOP model)" + (", min of prefill/decode" if mode == "e2e" else ""),
                          fontsize=8)
            if col == "kl":
                ax.set_yscale("symlog", linthresh=1e-2)
            ax.grid(alpha=0.3)
    _finish(plt, fig, axes, title, path)


def compute_seconds(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The compute the records state (each finished document's seconds for its row): total and documents counted."""
    done = [r for r in records if r["task"] == "done"]
    timed = [r["seconds"] for r in done if r.get("seconds") is not None]
    return {"seconds": sum(timed), "timed": len(timed), "documents": len(done)}


def write_outputs(records: list[dict[str, Any]], out: Path, meta: dict[str, Any], study: dict[str, Any] | None,
                  doc: Path | None = None, notes: str = "") -> dict[str, Any]:
    """quality.md / quality.json / quality.png into `out` (and the document at `doc`, its plots and data JSON
    beside it)."""
    rows = aggregate(records)
    per_context = aggregate(records, by_context=True)
    units = unit_values(records)
    ours = "adaskip-best" if any(r["method"] == "adaskip-best" for r in rows) else "adaskip"
    contexts = sorted({r["context"] for r in per_context})
    at = {c: [r for r in per_context if r["context"] == c] for c in contexts}
    vs = {c: verdicts(at[c], ours, units) for c in contexts}
    paper = {c: verdicts(at[c], "adaskip", units) for c in contexts} if ours != "adaskip" else {}
    matched = {c: matched_speed(at[c], units) for c in contexts}
    data = {"meta": meta, "study": study, "rows": rows, "per_context": per_context, "verdicts": vs,
            "verdicts_paper_rule": paper, "matched_speed": matched, "ours": ours,
            "decode_steps": decode_steps(records), "compute": compute_seconds(records)}
    write_text(out / "quality.json", json.dumps(data, indent=1))
    # the plot shows the context with the most rows (contexts may cover different budgets)
    shown = max(contexts, key=lambda c: (sum(r["context"] == c for r in per_context), -c)) if contexts else 0
    data["plot_context"] = shown
    plotted = [r for r in per_context if r["context"] == shown]
    title = f"{meta.get('model', 'model')}: quality at equal budget, {shown}-token prompts"
    ftitle = f"{meta.get('model', 'model')}: quality vs ideal speedup, {shown}-token prompts (95% CI)"
    plot(plotted, out / "quality.png", title)
    frontier_plot(plotted, out / "quality-frontier.png", ftitle)
    write_text(out / "quality.md", render(data, "quality.png", notes, frontier_png="quality-frontier.png"))
    if doc is not None:
        name = slug(meta.get("model", "model"))
        png, fpng = doc.with_name(f"{doc.stem}-{name}.png"), doc.with_name(f"{doc.stem}-{name}-frontier.png")
        # merged first: a document that cannot take the section stops the run before anything beside it is written
        merged = merge_section(read_document(doc), meta.get("model", "model"),
                               render(data, png.name, notes, depth=2, frontier_png=fpng.name))
        doc.parent.mkdir(parents=True, exist_ok=True)
        # the numbers beside the document, so adaskip-eval-summary can gather several reports' verdicts
        write_text(doc.with_name(f"{doc.stem}-{name}.json"), json.dumps({**data, "meta": {**meta, "doc": doc.name}},
                                                                    indent=1))
        plot(plotted, png, title)
        frontier_plot(plotted, fpng, ftitle)
        write_text(doc, merged)
    return data


DOC_TITLE = "# Quality at equal budget"
DOC_INTRO = ("Generated by `adaskip-eval` (adaskip/eval/), one section per model. `adaskip-eval --doc` rewrites "
             "its model's section and keeps the others.")


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def merge_section(doc: str, model: str, section: str, replace_unmarked: bool = True,
                  head: str = f"{DOC_TITLE}\n\n{DOC_INTRO}") -> str:
    """The document with `model`'s section replaced by `section` (appended when new). A marker counts only alone on
    its line (prose may quote one); a start without its end, an end before its start or two sections of one name
    are an InputError (rewriting them would cut text). A document without any section markers (an older
    single-model report) is replaced, or kept and appended to (`replace_unmarked` False); an empty one becomes
    `head` (title and introduction) and the section."""
    begin, end = f"<!-- adaskip-eval: {model} -->", f"<!-- /adaskip-eval: {model} -->"
    block = f"{begin}\n{section.strip()}\n{end}"
    lines = doc.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.strip() == begin]
    ends = [i for i, ln in enumerate(lines) if ln.strip() == end]
    if starts or ends:
        if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
            raise InputError(f"the document's {model!r} section markers are broken ({len(starts)} start and "
                             f"{len(ends)} end lines, in that order or not): mend them by hand")
        return "".join(lines[:starts[0]]) + block + "\n" + "".join(lines[ends[0] + 1:])
    marked = any(ln.startswith("<!-- adaskip-eval: ") and ln.rstrip().endswith("-->") for ln in lines)
    if not marked and (replace_unmarked or not doc.strip()):
        return f"{head}\n\n{block}\n"
    return doc.rstrip("\n") + f"\n\n{block}\n"


def _compute_note(data: dict[str, Any]) -> str:
    c = data.get("compute") or {}
    if not c.get("timed"):
        return "not recorded (records of an older run)"
    hours = c["seconds"] / 3600
    part = "" if c["timed"] == c["documents"] else f" ({c['timed']} of {c['documents']} document runs timed)"
    return (f"{hours:.2f} h of evaluation{part} (wall time of the document runs, reference torch engine on "
            f"{data['meta'].get('threads', '?')} threads; calibration and the study not included)")


def render(data: dict[str, Any], png: str, notes: str, depth: int = 1, frontier_png: str | None = None) -> str:
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
              f"{_documents(data['per_context'])} (seed {o['seed']}); retrieval questions per cell: "
              f"{_questions(data['per_context'])}. Documents come from a corpus region no calibration window "
              f"touches; every method answers the same questions (a paired design).",
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
              "* Uncertainty: 95% intervals in parentheses: exact binomial (Clopper-Pearson) for exact-match rates, "
              "bootstrap (BCa, fixed seed, resampling documents) for ROUGE-L and KL, none under "
              f"{stats.MIN_BOOTSTRAP} documents. Comparisons are paired on the same questions / documents: McNemar's "
              "exact test for exact match (Δ: the difference in rates with its exact interval, conditional on the "
              "discordant questions), a paired bootstrap of the mean difference and the sign test's p for ROUGE-L "
              "and KL. Verdict from the interval of Δ: **beats** / **loses** when it excludes 0, **ties** when it "
              f"lies within ±{100 * MARGINS['retrieval']:.0f} points (retrieval), ±{MARGINS['rougeL']} (ROUGE-L), "
              f"±{MARGINS['kl']} nats (KL; an exact-match tie also needs the bound that covers how many questions may "
              "disagree), else **inconclusive**; questions sharing a document are counted as independent "
              "(slightly optimistic intervals).",
              f"* Compute: {_compute_note(data)}.",
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
        if data.get("matched_speed", {}).get(c):
            lines += [f"{h3} At matched ideal speedup ({c} tokens)", "",
                      "For each mode and speedup target: the best AdaSkip configuration (any variant and K) whose "
                      "ideal speedup reaches the target against the best baseline configuration that reaches it "
                      "(best point estimate on each metric), compared on the same questions. Speedup: prefill mode "
                      "the prefill's, decode mode the decode steps', e2e the smaller of the two.", "",
                      matched_table(data["matched_speed"][c]), ""]
            ms = [v for v in data["matched_speed"][c] if v["speedup"] <= TARGET_SPEEDUP + 1e-9]
            misses = target_misses(ms)
            cells = [v[col] for v in ms for col in COMPARED if col in v]
            decided = sum(x["verdict"] != "n/a" for x in cells)
            span = (f"{min(v['speedup'] for v in ms):.2f}x–{max(v['speedup'] for v in ms):.2f}x" if ms else "none")
            lines += [f"At every matched speedup up to {TARGET_SPEEDUP}x, is the best AdaSkip configuration at least "
                      f"as good as the best baseline (no **loses**)? "
                      + ("yes" if not misses else f"no: {', '.join(misses)}")
                      + f" (targets compared: {span}; {decided} of {len(cells)} comparisons have an interval).", ""]
        if data["verdicts"].get(c):
            lines += [f"{h3} {data['ours']} vs the best baseline at equal budget K ({c} tokens)", "",
                      "Each cell: verdict, ours vs the best of the baselines evaluated ("
                      + " / ".join(b for b in BASELINES if any(r["method"] == b for r in rows_c))
                      + ", by its point estimate), Δ = ours - theirs with its 95% interval, and the paired test's p.",
                      "",
                      verdict_table(data["verdicts"][c]), ""]
        if data["verdicts_paper_rule"].get(c):
            lines += [f"{h3} The paper's rule (adaskip) vs the best baseline ({c} tokens)", "",
                      verdict_table(data["verdicts_paper_rule"][c]), ""]
        if any(not math.isnan(speed(r)) and r["method"] != "full" for r in rows_c):
            lines += [f"{h3} Frontier: every configuration by ideal speedup ({c} tokens)", "",
                      frontier_table(rows_c), ""]
    lines += [f"![quality]({png})", ""]
    if frontier_png:
        lines += [f"![quality vs ideal speedup]({frontier_png})", ""]
    lines += [f"The plots show the {data.get('plot_context')}-token prompts.", ""]
    if notes.strip():  # the notes' own headings move down with the report's
        lines += ["\n".join("#" * (depth - 1) + ln if ln.startswith("#") else ln for ln in notes.strip().splitlines()),
                  ""]
    return "\n".join(lines)
