"""importance.png: attention vs FFN IO similarity per layer, skipped sublayers marked."""

from __future__ import annotations

from pathlib import Path

from adaskip.plan import SkipPlan


def importance_plot(plan: SkipPlan, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calib = plan.calibration
    layers = list(range(plan.num_layers))
    fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
    if calib is not None:
        attn = [calib.similarity[2 * i] for i in layers]
        ffn = [calib.similarity[2 * i + 1] for i in layers]
        ax.plot(layers, attn, "o-", label="attention", color="tab:blue", ms=4)
        ax.plot(layers, ffn, "s-", label="FFN", color="tab:orange", ms=4)
        sk = sorted(plan.skip)
        ax.scatter([j // 2 for j in sk], [calib.similarity[j] for j in sk], marker="x", s=90, color="red",
                   zorder=5, label=f"skipped offline ({len(sk)})")
        if plan.beta is not None:
            ax.axhline(plan.beta, ls="--", color="gray", lw=0.8, label=f"beta = {plan.beta:.4f}")
        ax.set_ylabel("IO cosine similarity (prefill)")
    ax.set_xlabel("layer")
    ax.set_title(f"{plan.model_name or 'model'}: {plan.method}, mode {plan.mode}, K={plan.k} {plan.budget_unit}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
