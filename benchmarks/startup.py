"""Time to ready: `loopserve serve` against stock vLLM's server, same checkpoint and options.

Each server starts twice: from an empty compile cache, then again with the cache its
first start left (vLLM's `VLLM_CACHE_ROOT`), in the order stock, loopserve, stock,
loopserve, one at a time. Ready means `/health` answers 200: vLLM opens its port only
once the engine has loaded, profiled, compiled and warmed up.

    python -m loopserve.benchmarks.startup [--max-loops 4] [--out DIR] [-- EXTRA ARGS]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from loopserve.server.default_model import default_model_path
from loopserve.server.launcher import start_server, start_stock_vllm


def time_to_ready(kind: str, args: list[str], cache_root: str, log: Path) -> float:
    """Seconds from launch to /health 200 for one start under `cache_root`."""
    os.environ["VLLM_CACHE_ROOT"] = cache_root
    start = start_server if kind == "loopserve" else start_stock_vllm
    began = time.monotonic()
    server = start(args, str(log))
    elapsed = time.monotonic() - began
    server.stop()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-loops", type=int, default=None, help="loopserve's --max-loops")
    parser.add_argument("--out", default=None, help="folder for startup.json and server logs")
    parser.add_argument("extra", nargs="*", help="options for both servers (after --)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="loopserve-startup-"))
    out.mkdir(parents=True, exist_ok=True)
    # The KV space `loopserve serve` sets by default; stock vLLM on a CPU otherwise
    # reserves 92% of the host's memory.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model = str(default_model_path())
    common = ["--max-model-len", "2048", *args.extra]
    commands = {
        "stock": ["--model", model, "--served-model-name", "SmolLM2-135M-Instruct", *common],
        "loopserve": [
            *common,
            *(["--max-loops", str(args.max_loops)] if args.max_loops else []),
        ],
    }
    caches = {kind: tempfile.mkdtemp(prefix=f"startup-cache-{kind}-") for kind in commands}
    seconds: dict[str, dict[str, float]] = {"empty cache": {}, "second start": {}}
    for run, times in seconds.items():
        for kind, options in commands.items():
            log = out / f"{kind}-{run.replace(' ', '-')}.log"
            times[kind] = time_to_ready(kind, options, caches[kind], log)
            print(f"{run:>12}  {kind:>9}  {times[kind]:7.1f} s", flush=True)
    print("\n| start | stock vLLM s | loopserve s | loopserve / stock |\n|---|---|---|---|")
    for run, times in seconds.items():
        ratio = times["loopserve"] / times["stock"]
        print(f"| {run} | {times['stock']:.1f} | {times['loopserve']:.1f} | {ratio:.2f} |")
    (out / "startup.json").write_text(json.dumps({"commands": commands, "seconds": seconds}))


if __name__ == "__main__":
    main()
