"""Statistics and output files shared by `bench accuracy` and `bench serve`.

Pure functions (no server, no network) so the numbers a benchmark reports can be unit-tested
on their own: Wilson intervals, percentile summaries, tables, CSV/JSON and the accuracy plot.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

Z95 = 1.959963984540054  # two-sided 95% normal quantile
PERCENTILES = (50, 90, 99)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval: unlike the normal one it stays in [0, 1] and works at p=0, 1.

    With n = 0 nothing is known, so the interval is all of [0, 1].
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact 0 and 1 at the ends
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def mean_interval(counts: Sequence[tuple[int, int]], z: float = Z95) -> tuple[float, float]:
    """95% normal interval of the unweighted mean of independent proportions (successes, n).

    Centred on the mean itself; each variance uses the Agresti-Coull estimate (z^2/2 extra
    successes and failures), so tasks at 0% or 100% do not collapse the interval to a point.
    """
    if not counts or any(n <= 0 for _, n in counts):
        return 0.0, 1.0
    mean = sum(x / n for x, n in counts) / len(counts)
    adjusted = [((x + z * z / 2) / (n + z * z), n + z * z) for x, n in counts]
    half = z * math.sqrt(sum(p * (1 - p) / m for p, m in adjusted)) / len(counts)
    return max(0.0, mean - half), min(1.0, mean + half)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), so results match `vllm bench serve`."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_stats(name: str, seconds: Sequence[float]) -> dict[str, float | None]:
    """mean/std/median/p90/p99 of one latency in ms, named like vLLM (`median_ttft_ms`).

    No samples (e.g. TPOT of one-token outputs) gives None rather than NaN, which JSON lacks.
    """
    ms = [1000.0 * s for s in seconds]
    keys = [f"mean_{name}_ms", f"std_{name}_ms"] + [
        f"{'median' if q == 50 else f'p{q}'}_{name}_ms" for q in PERCENTILES
    ]
    if not ms:
        return dict.fromkeys(keys)
    mean = sum(ms) / len(ms)
    std = math.sqrt(sum((x - mean) ** 2 for x in ms) / len(ms))
    return dict(zip(keys, [mean, std, *(percentile(ms, q) for q in PERCENTILES)], strict=True))


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Plain fixed-width table, readable in a terminal and in a log file."""
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_accuracy(path: Path, rows: Sequence[dict[str, Any]], title: str) -> None:
    """Accuracy vs FLOPs/token: a thin line per task, the bold mean, each point labelled k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    for task in tasks:
        points = sorted((r for r in rows if r["task"] == task), key=lambda r: r["loops"])
        xs = [r["flops_per_token"] / 1e9 for r in points]
        ys = [r["accuracy"] for r in points]
        is_mean = task == "mean"
        style = {"color": "black", "linewidth": 3, "zorder": 3} if is_mean else {"alpha": 0.7}
        ax.plot(xs, ys, marker="o", label=task, **style)
        for x, y, r in zip(xs, ys, points, strict=True):
            text = f"k={r['loops']}" if is_mean else str(r["loops"])
            ax.annotate(
                text,
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=9 if is_mean else 7,
                fontweight="bold" if is_mean else "normal",
            )
    ax.set_xlabel("forward FLOPs per token (GFLOPs)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
