"""`loopserve bench scan`: which block is worth looping, and how often.

A server's loop block is fixed at start-up, so the scan starts one `loopserve serve` per
block, runs the accuracy suite at every loop count on the same items, and stops it. Each
block's full accuracy run (rows, paired tests, items) is kept in `DIR/block_S_E/`, so any two
blocks can also be overlaid with `bench compare`. The heatmap shows the headline mean
(over task families) per (block, k), and its gain over k=1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from loopserve.benchmarks import accuracy, plots, report
from loopserve.benchmarks.cli import BenchError, serve_args, started_server


def blocks_to_scan(args: argparse.Namespace, num_layers: int) -> list[tuple[int, int]]:
    """--blocks as given, or every --block-size block at --stride (default: size 4, stride 2)."""
    if args.blocks:
        blocks = args.blocks
    else:
        size = args.block_size or 4
        blocks = [(s, s + size) for s in range(0, num_layers - size + 1, args.stride)]
    outside = [f"{s}:{e}" for s, e in blocks if e > num_layers]
    if outside or not blocks:
        raise BenchError(f"blocks {', '.join(outside) or '(none)'} do not fit {num_layers} layers")
    return blocks


def scan_rows(block: tuple[int, int], result: accuracy.Measurement) -> list[dict[str, Any]]:
    """One row per loop count: the headline mean with its interval, and every task's accuracy."""
    rows = []
    for mean in (r for r in result.rows if r["task"] == accuracy.MEAN_TASK):
        k = mean["loops"]
        rows.append(
            {
                "block_start": block[0],
                "block_end": block[1],
                "loops": k,
                "mean_accuracy": mean["accuracy"],
                "ci95_low": mean["ci95_low"],
                "ci95_high": mean["ci95_high"],
                "flops_per_token": mean["flops_per_token"],
                "tasks": {
                    r["task"]: r["accuracy"]
                    for r in result.rows
                    if r["loops"] == k and r["task"] != accuracy.MEAN_TASK
                },
            }
        )
    return rows


def main(args: argparse.Namespace) -> int:
    from loopserve.server.engine import read_hf_config

    num_layers = read_hf_config(accuracy.model_path_of(args.model))["num_hidden_layers"]
    blocks = blocks_to_scan(args, num_layers)
    examples = accuracy.suite_examples(args.tasks, args.n, args.shots, args.seed)
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    timings = []
    began = time.monotonic()
    for start, end in blocks:
        folder = out / f"block_{start}_{end}"
        block_began = time.monotonic()
        options = serve_args(args, loop_block=f"{start}:{end}", max_loops=max(args.loops))
        with started_server(options, folder / "server.log") as url:
            result = accuracy.measure(url, None, args.model, examples, args.loops, args.concurrency)
        config = accuracy.describe(
            result,
            args.model,
            args.dtype,
            examples,
            loops=args.loops,
            n=args.n,
            shots=args.shots,
            seed=args.seed,
            concurrency=args.concurrency,
        )
        accuracy.write_outputs(folder, config, result)
        rows += scan_rows((start, end), result)
        timings.append(
            {"block_start": start, "block_end": end, "seconds": time.monotonic() - block_began}
        )
        print(f"block {start}:{end} done in {timings[-1]['seconds']:.0f} s", file=sys.stderr)
    seconds = time.monotonic() - began
    per_block = seconds / len(blocks)
    size = args.block_size or 4
    full = len(range(0, num_layers - size + 1, args.stride))
    summary = {
        "config": {**config, "blocks": [f"{s}:{e}" for s, e in blocks]},
        "rows": rows,
        "timings": timings,
        "seconds": seconds,
        "full_scan": {
            "blocks": full,
            "block_size": size,
            "stride": args.stride,
            "estimated_seconds": per_block * full,
        },
    }
    report.write_json(out / "scan.json", summary)
    flat = [{**{k: v for k, v in r.items() if k != "tasks"}, **r["tasks"]} for r in rows]
    columns = [k for k in rows[0] if k != "tasks"] + list(rows[0]["tasks"])
    report.write_csv(out / "scan.csv", flat, columns)
    heading = (
        f"{config['model']} block scan, dtype {args.dtype}, n={args.n}/task, "
        f"{len(args.tasks)} tasks; {config['precision']}"
    )
    plots.plot_scan(out / "scan.png", rows, heading)
    print(report.format_table(flat, columns[:7]))
    print(
        f"scanned {len(blocks)} blocks in {seconds:.0f} s ({per_block:.0f} s per block); a full "
        f"scan ({full} blocks of {size}, stride {args.stride}) at these settings takes about "
        f"{per_block * full / 60:.0f} min. Wrote {out / 'scan.json'}, scan.csv, scan.png",
        file=sys.stderr,
    )
    return 0
