"""The benchmark figures: accuracy vs FLOPs (one run, several runs), block-scan heatmap, and
per-layer diagnostics. Each takes plain rows (the JSON a command writes), so a figure can be
redrawn from saved results without a server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MEAN = "mean"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def title(config: dict[str, Any]) -> str:
    """Model, loop block, serving dtype and weight precision: what a reader needs to compare."""
    plan = config["loop_plan"]
    n = f", n={config['n']}/cell" if config.get("n") else ""
    return (
        f"{config['model']}: loop block {plan['start']}:{plan['end']} of {plan['num_layers']}, "
        f"dtype {config.get('dtype', '?')}{n}\n{config.get('precision', '')}"
    )


def _errorbar(ax, points: Sequence[dict[str, Any]], **style: Any) -> str:
    """Accuracy vs GFLOPs/token with 95% interval bars; returns the line's colour."""
    xs = [p["flops_per_token"] / 1e9 for p in points]
    ys = [p["accuracy"] for p in points]
    errors = [
        [max(0.0, p["accuracy"] - p["ci95_low"]) for p in points],
        [max(0.0, p["ci95_high"] - p["accuracy"]) for p in points],
    ]
    return ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, **style).lines[0].get_color()


def _k_axis(ax, points: Sequence[dict[str, Any]]) -> None:
    """Loop counts as ticks on a top axis (at the panel's mean FLOPs per k), clear of the data."""
    flops: dict[int, list[float]] = {}
    for p in points:
        flops.setdefault(p["loops"], []).append(p["flops_per_token"] / 1e9)
    top = ax.secondary_xaxis("top")
    top.set_xticks([sum(v) / len(v) for v in flops.values()])
    top.set_xticklabels([f"k={k}" for k in flops], fontsize=8)


def _by_loops(rows: Sequence[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r["task"] == task), key=lambda r: r["loops"])


def plot_accuracy(
    path: Path,
    rows: Sequence[dict[str, Any]],
    families: Sequence[dict[str, Any]],
    heading: str,
) -> None:
    """One panel per task family (its tasks, dotted guessing baselines) plus the headline mean."""
    plt = _pyplot()
    names = list(dict.fromkeys(r["family"] for r in rows if r["task"] != MEAN))
    panels = [*names, MEAN]
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        if panel == MEAN:
            for name in names:
                _errorbar(ax, _by_loops(families, name), label=name, alpha=0.6, linewidth=1)
            shown = _by_loops(rows, MEAN)
            _errorbar(ax, shown, label="mean over families", color="black", linewidth=2.5)
        else:
            shown = [r for r in rows if r["family"] == panel]
            for task in dict.fromkeys(r["task"] for r in shown):
                points = _by_loops(rows, task)
                color = _errorbar(ax, points, label=task, linewidth=1.2)
                baseline = points[0].get("guess_baseline")
                if baseline is not None:
                    ax.axhline(baseline, color=color, linestyle=":", linewidth=1)
        ax.set_title(panel if panel != MEAN else "headline: mean over task families", fontsize=10)
        _k_axis(ax, shown)
        ax.set_xlabel("forward GFLOPs per token")
        ax.set_ylabel("exact-match accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best", framealpha=0.6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(heading + "\nbars: 95% intervals; dotted: guessing baseline", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point dominates (no more FLOPs and no less accuracy, better in one),
    by increasing FLOPs; identical points are all kept."""

    def dominates(q: dict[str, Any], p: dict[str, Any]) -> bool:
        no_worse = q["flops_per_token"] <= p["flops_per_token"] and q["accuracy"] >= p["accuracy"]
        better = q["flops_per_token"] < p["flops_per_token"] or q["accuracy"] > p["accuracy"]
        return no_worse and better

    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda p: (p["flops_per_token"], -p["accuracy"]))


def plot_compare(
    path: Path, runs: Sequence[tuple[str, list[dict[str, Any]]]], front: Sequence[dict[str, Any]]
) -> None:
    """Each run's headline curve with intervals; the Pareto front across all runs marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, points in runs:
        _errorbar(ax, points, label=label, linewidth=1.5)
        for p in points:
            ax.annotate(
                f"k={p['loops']}",
                (p["flops_per_token"] / 1e9, p["accuracy"]),
                textcoords="offset points",
                xytext=(5, -10),
                fontsize=7,
            )
    ax.step(
        [p["flops_per_token"] / 1e9 for p in front],
        [p["accuracy"] for p in front],
        where="post",
        color="black",
        linestyle="--",
        linewidth=1,
        label="Pareto front",
    )
    ax.scatter(
        [p["flops_per_token"] / 1e9 for p in front],
        [p["accuracy"] for p in front],
        s=160,
        facecolors="none",
        edgecolors="black",
        zorder=4,
    )
    ax.set_xlabel("forward GFLOPs per token")
    ax.set_ylabel("mean accuracy (headline)")
    ax.set_title("accuracy vs FLOPs across runs (bars: 95% intervals)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scan(path: Path, rows: Sequence[dict[str, Any]], heading: str) -> None:
    """Heatmaps over (block, k): mean accuracy, and its gain over k=1 when k=1 was run."""
    plt = _pyplot()
    blocks = sorted({(r["block_start"], r["block_end"]) for r in rows})
    loops = sorted({r["loops"] for r in rows})
    acc = {(r["block_start"], r["block_end"], r["loops"]): r["mean_accuracy"] for r in rows}
    grids = [("mean accuracy", [[acc[(*b, k)] for k in loops] for b in blocks], "viridis")]
    if 1 in loops:
        gain = [[acc[(*b, k)] - acc[(*b, 1)] for k in loops] for b in blocks]
        grids.append(("gain over k=1", gain, "RdBu"))
    fig, axes = plt.subplots(
        1, len(grids), figsize=(4 + 1.2 * len(loops) * len(grids), 1.5 + 0.5 * len(blocks))
    )
    axes = [axes] if len(grids) == 1 else list(axes)
    for ax, (name, grid, cmap) in zip(axes, grids, strict=True):
        values = [v for row in grid for v in row]
        if cmap == "RdBu":  # diverging around zero: red loses, blue gains
            bound = max(abs(v) for v in values) or 1.0
            low, high = -bound, bound
        else:
            low, high = min(values), max(values)
            high = high if high > low else low + 1e-9
        image = ax.imshow(grid, cmap=cmap, vmin=low, vmax=high, aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if cmap == "RdBu":
                    light = abs(value) / high < 0.6
                else:
                    light = (value - low) / (high - low) > 0.6
                ax.text(
                    j,
                    i,
                    f"{value:+.3f}" if cmap == "RdBu" else f"{value:.3f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if light else "white",
                )
        ax.set_xticks(range(len(loops)), [f"k={k}" for k in loops])
        ax.set_yticks(range(len(blocks)), [f"{s}:{e}" for s, e in blocks])
        ax.set_xlabel("loop count")
        ax.set_ylabel("loop block")
        ax.set_title(name, fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DIAGNOSTICS = (
    ("lens_accuracy", "logit-lens top-1 = answer (share of prompts)", False),
    ("lens_rank", "logit-lens rank of the answer (median)", True),
    ("residual_norm", "residual-stream norm ||h_out||", False),
    ("relative_update", "relative update ||h_out - h_in|| / ||h_in||", True),
    ("attn_mlp_ratio", "||attention out|| / ||MLP out||", False),
)


def plot_diagnose(path: Path, curves: Sequence[dict[str, Any]], heading: str) -> None:
    """One panel per diagnostic against executed depth, one line per k; block passes shaded."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, (key, label, log) in zip(axes.flat, DIAGNOSTICS, strict=False):
        for curve in curves:
            depth = range(1, len(curve[key]) + 1)
            ax.plot(depth, curve[key], marker=".", label=f"k={curve['loops']}", linewidth=1.2)
        deepest = max(curves, key=lambda c: c["loops"])
        for j, (start, end) in enumerate(deepest["passes"]):
            ax.axvspan(start - 0.5, end + 0.5, color="grey", alpha=0.07 if j % 2 else 0.15)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("executed layer (block passes shaded, at the largest k)")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes.flat[-1].axis("off")
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
