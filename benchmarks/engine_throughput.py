"""Engine throughput, side by side in one run: stock vLLM vs the looped model per k.

Decode-heavy offline load (default: batch 16, 64 prompt tokens, 64 generated, EOS
ignored), stock and looped alike at vLLM's default settings (compiled; `--enforce-eager`
turns compilation off for both). After one warm-up run each, the looped loads run in
`--repeats` rounds, each load once per round; ratios between looped loads are the
median of their per-round ratios, seconds the median per load. Prints the ratios the
engine issues ask for:

- k=1 looped vs stock vLLM (same checkpoint): throughput ratio, goal >= 0.97;
- k=2, k=4 vs the ideal from executed depth: (t_k / t_1) / (depth_k / depth_1), goal <= 1.05;
- a load mixing k in {1, 2, 4} vs the ideal from the fixed-k runs, goal >= 0.95.

    python -m loopserve.benchmarks.engine_throughput [--dtype bfloat16] [--model DIR]
        [--enforce-eager] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _prompts(batch: int, input_len: int, seed: int) -> list[dict[str, Any]]:
    import random

    rng = random.Random(seed)
    return [
        {"prompt_token_ids": [rng.randrange(100, 20000) for _ in range(input_len)]}
        for _ in range(batch)
    ]


def _seconds(llm: Any, prompts: list, params: list) -> float:
    """Seconds to finish the whole batch once."""
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == params[0].max_tokens for o in outputs)
    return elapsed


def _time_loads(llm: Any, prompts: list, loads: dict[str, list], repeats: int) -> dict:
    """Seconds per round for each load: one warm-up run each, then `repeats` rounds in
    which every load runs once, in turn. Ratios between loads are taken within a round,
    so the machine's drift over minutes (10% here) stays out of them."""
    for params in loads.values():
        llm.generate(prompts, params, use_tqdm=False)
    rounds: dict[str, list[float]] = {name: [] for name in loads}
    for _ in range(repeats):
        for name, params in loads.items():
            rounds[name].append(_seconds(llm, prompts, params))
    return rounds


def _stop(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from loopserve.server.engine import EngineConfig, vllm_engine_kwargs

    prompts = _prompts(args.batch, args.input_len, args.seed)
    common = {
        "dtype": args.dtype,
        "max_model_len": 1024,
        "enforce_eager": args.enforce_eager,
        "enable_prefix_caching": False,
    }
    config = EngineConfig(model=args.model, max_loops=4, **common)
    kwargs, info = vllm_engine_kwargs(config)
    tokens = args.batch * args.output_len

    def params(loops: int | None) -> Any:
        extra = {"extra_args": {"loops": loops}} if loops else {}
        return SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, **extra)

    stock = LLM(kwargs["model"], seed=0, **common)
    rounds = _time_loads(stock, prompts, {"stock": [params(None)] * args.batch}, args.repeats)
    _stop(stock)
    mixed_loops = [(1, 2, 4)[i % 3] for i in range(args.batch)]
    loads = {f"k={k}": [params(k)] * args.batch for k in (1, 2, 4)}
    loads["mixed"] = [params(k) for k in mixed_loops]
    looped = LLM(**kwargs)
    rounds |= _time_loads(looped, prompts, loads, args.repeats)
    _stop(looped)

    plan = info.plan
    seconds = {name: statistics.median(times) for name, times in rounds.items()}
    throughput = {name: tokens / s for name, s in seconds.items()}

    def per_round(ratio: Any) -> float:
        """The median over rounds of `ratio(round's seconds by load)`."""
        looped_rounds = zip(*(rounds[name] for name in loads), strict=True)
        return statistics.median(ratio(dict(zip(loads, r, strict=True))) for r in looped_rounds)

    ratios = {
        "k1_vs_stock_throughput": seconds["stock"] / seconds["k=1"],
        **{
            f"k{k}_time_over_depth": per_round(
                lambda t, k=k: (
                    (t[f"k={k}"] / t["k=1"]) / (plan.executed_depth(k) / plan.executed_depth(1))
                )
            )
            for k in (2, 4)
        },
        "mixed_vs_ideal_throughput": per_round(
            lambda t: statistics.mean(t[f"k={k}"] for k in mixed_loops) / t["mixed"]
        ),
    }
    return {
        "config": {**vars(args), "model": kwargs["model"], "loop_block": [plan.start, plan.end]},
        "seconds": seconds,
        "rounds": rounds,
        "output_tokens_per_second": throughput,
        "ratios": ratios,
    }


def load_parser(description: str) -> argparse.ArgumentParser:
    """The options of the offline load (model, dtype, batch, lengths, seed, --out)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=None, help="checkpoint (default: embedded model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON result here")
    return parser


def main() -> None:
    parser = load_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--enforce-eager", action="store_true", help="no compilation, stock and looped alike"
    )
    result = run(parser.parse_args())
    text = json.dumps(result, indent=2)
    print(text)
    if result["config"]["out"]:
        with open(result["config"]["out"], "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
