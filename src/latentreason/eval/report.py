"""Tables and plots from evaluation summaries (matplotlib only when plotting)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def table(summaries: list[dict[str, Any]]) -> str:
    """A fixed-width comparison table: one row per evaluated method."""
    head = f"{'method':14} {'task':10} {'split':6} {'n':>5} {'accuracy':>9} {'95% CI':>15} {'flexible':>9} {'reason.pos':>10} {'q/s':>8}"
    lines = [head, "-" * len(head)]
    for s in summaries:
        lo, hi = s["accuracy_ci95"]
        lines.append(
            f"{s['method']:14} {s['task']:10} {s['split']:6} {s['n']:>5} {s['accuracy']:>9.3f} "
            f"{f'[{lo:.3f},{hi:.3f}]':>15} {s['accuracy_flexible']:>9.3f} {s['mean_reasoning_positions']:>10.1f} "
            f"{s['questions_per_second']:>8.1f}"
        )
    return "\n".join(lines)


def plot_accuracy_vs_positions(summaries: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy (with its 95% interval) against mean reasoning positions, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s in summaries:
        lo, hi = s["accuracy_ci95"]
        x, y = s["mean_reasoning_positions"], s["accuracy"]
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", capsize=4, label=s["method"])
        ax.annotate(f"{s['method']} {y:.0%}", (x, y), textcoords="offset points", xytext=(6, -12))
    ax.set_xlabel("mean reasoning positions per question (latent steps + chain tokens)")
    ax.set_ylabel("accuracy (strict)")
    ax.set_ylim(-0.02, 1.05)
    ax.margins(x=0.2)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
