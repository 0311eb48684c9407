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
    fig, ax = plt.subplots(figsize=(9, 4.4), dpi=110)
    if calib is not None:
        # 1 - s on a log axis: the informative range (s between 0.95 and 1) is not squashed by outlier layers
        def dist(j: int) -> float:
            return max(1.0 - calib.similarity[j], 1e-6)

        ax.plot(layers, [dist(2 * i) for i in layers], "o-", label="attention", color="tab:blue", ms=4)
        ax.plot(layers, [dist(2 * i + 1) for i in layers], "s-", label="FFN", color="tab:orange", ms=4)
        sk = sorted(plan.skip)
        ax.scatter([j // 2 for j in sk], [dist(j) for j in sk], marker="x", s=90, color="red", zorder=5,
                   label=f"skipped offline ({len(sk)})")
        if plan.beta is not None:
            ax.axhline(max(1.0 - plan.beta, 1e-6), ls="--", color="gray", lw=0.8,
                       label=f"online threshold: s >= beta = {plan.beta:.4f}")
        ax.set_yscale("log")
        ax.set_ylabel("1 - IO cosine similarity (prefill)\nlower = more skippable")
    else:  # a baseline: no calibration, show which layers it drops
        skipped_layers = sorted({j // 2 for j in plan.skip})
        ax.bar(layers, [1 if i in skipped_layers else 0 for i in layers], color="tab:red",
               label=f"layers skipped ({len(skipped_layers)})")
        ax.set_yticks([])
        ax.set_ylabel("skipped")
    ax.set_xlabel("layer")
    ax.set_title(f"{plan.model_name or 'model'}: {plan.method}, mode {plan.mode}, K={plan.k} {plan.budget_unit}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
