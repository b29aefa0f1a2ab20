"""`loopserve bench compare RUN_DIR... --out DIR`: several runs on one accuracy-vs-FLOPs plot.

Runs may differ in model, loop block, dtype or weights (adapted vs base); each contributes its
headline mean per loop count, read from the `accuracy.json` that `bench accuracy` and
`bench lm-eval` write. The Pareto front over all (run, k) points shows which configuration
buys accuracy most cheaply; the merged table lists every point with its run's labels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from loopserve.benchmarks import plots, report
from loopserve.benchmarks.cli import BenchError

COLUMNS = (
    "run",
    "model",
    "loop_block",
    "dtype",
    "precision",
    "loops",
    "accuracy",
    "ci95_low",
    "ci95_high",
    "flops_per_token",
    "pareto",
)


def read_run(folder: str) -> dict[str, Any]:
    path = Path(folder) / "accuracy.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BenchError(f"{path}: cannot read ({error})") from None
    if not isinstance(data, dict) or not {"config", "rows"} <= data.keys():
        raise BenchError(f"{path}: not a `bench accuracy` result (no config and rows)")
    return data


def default_label(config: dict[str, Any]) -> str:
    plan = config["loop_plan"]
    return f"{config['model']} {plan['start']}:{plan['end']} {config.get('dtype', '?')}"


def merged_rows(runs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The headline row of every (run, k), with the run's identity and Pareto membership."""
    points = []
    for label, data in runs:
        config = data["config"]
        plan = config["loop_plan"]
        for row in data["rows"]:
            if row["task"] != plots.MEAN:
                continue
            points.append(
                {
                    "run": label,
                    "model": config["model"],
                    "loop_block": f"{plan['start']}:{plan['end']}",
                    "dtype": config.get("dtype"),
                    "precision": config.get("precision"),
                    **{key: row[key] for key in COLUMNS[5:-1]},
                }
            )
    front = plots.pareto_front(points)
    for point in points:
        point["pareto"] = any(point is p for p in front)
    return points


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(report.format_value(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    runs = [read_run(folder) for folder in args.runs]
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else []
    if labels and len(labels) != len(runs):
        raise BenchError(f"--labels has {len(labels)} labels for {len(runs)} runs")
    labels = labels or [default_label(run["config"]) for run in runs]
    if len(set(labels)) != len(labels):
        labels = [f"{label} [{folder}]" for label, folder in zip(labels, args.runs, strict=True)]
    rows = merged_rows(list(zip(labels, runs, strict=True)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / "compare.csv", rows, COLUMNS)
    report.write_json(out / "compare.json", {"runs": args.runs, "rows": rows})
    (out / "compare.md").write_text(markdown(rows))
    curves = [
        (label, sorted((r for r in rows if r["run"] == label), key=lambda r: r["loops"]))
        for label in labels
    ]
    plots.plot_compare(out / "compare.png", curves, plots.pareto_front(rows))
    print(report.format_table(rows, COLUMNS))
    print(f"wrote {out / 'compare.png'}, compare.csv, compare.json, compare.md", file=sys.stderr)
    return 0
