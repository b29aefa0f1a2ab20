"""Latency summaries and output files (tables, CSV, JSON) shared by the `bench` commands.

Pure functions (no server, no network) so the numbers a benchmark reports can be unit-tested
on their own.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def latency_stats(
    name: str, seconds: Sequence[float], percentiles: Sequence[int] = (50, 90, 99)
) -> dict[str, float | None]:
    """mean/std/median/percentiles of one latency in ms, named as `vllm bench serve` names
    them (`median_ttft_ms`, `p99_ttft_ms`) and computed as it computes them (numpy).

    No samples (e.g. TPOT of one-token outputs) gives None rather than NaN, which JSON lacks.
    """
    keys = [f"mean_{name}_ms", f"std_{name}_ms", f"median_{name}_ms"]
    keys += [f"p{q}_{name}_ms" for q in percentiles]
    if not seconds:
        return dict.fromkeys(keys)
    ms = 1000.0 * np.asarray(seconds, dtype=float)
    values = [ms.mean(), ms.std(), np.median(ms), *np.percentile(ms, percentiles)]
    return {key: float(value) for key, value in zip(keys, values, strict=True)}


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
