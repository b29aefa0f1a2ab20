"""`loopserve bench serve`: latency and throughput per loop count, in `vllm bench serve` terms.

Prompts are token-id lists, so every request has exactly --input-len prompt tokens, and
`ignore_eos` makes every request generate exactly --output-len tokens: loads differ only in
`loops`. Metric names follow vLLM's benchmark (`median_ttft_ms`, `output_throughput`, ...) so
numbers can sit next to a stock vLLM baseline measured with this same harness.

Fixed-k loads and the baseline share one prompt set (the per-loops prefix-cache salt keeps
fixed-k runs apart); the mixed load and warm-ups get their own sets, because their
(prompt, loops) pairs would otherwise hit KV cached by an earlier load and flatter TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from loopserve.benchmarks import report
from loopserve.benchmarks.cli import BenchError, auth_headers, check_loops, model_card
from loopserve.clients.client import DONE, LoopserveError, parse_sse_line

TOKEN_RANGE = (100, 20000)  # plain vocabulary ids in any tokenizer of 32k+ entries
WARMUP_REQUESTS = 2
WARMUP_OUTPUT_LEN = 16
RATIO_KEYS = ("output_throughput", "median_ttft_ms", "median_itl_ms")
TABLE = (
    "label",
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "median_e2el_ms",
)


@dataclass
class RequestResult:
    """Timings of one streamed request, in seconds from just before it was sent."""

    loops: int | None
    success: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, as vLLM defines it."""
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Load:
    """One measured load: a label, and per request its prompt and loop count (None: none sent)."""

    label: str
    prompts: list[list[int]]
    loops: list[int | None]


# ---------------------------------------------------------------- loads


def make_prompts(count: int, length: int, seed: int, tag: str) -> list[list[int]]:
    """`count` token-id prompts of exactly `length` ids, reproducible from (seed, tag)."""
    rng = random.Random(f"loopserve.bench.serve:{seed}:{tag}")
    low, high = TOKEN_RANGE
    return [[rng.randrange(low, high) for _ in range(length)] for _ in range(count)]


def plan_loads(args: argparse.Namespace) -> list[Load]:
    """One load per fixed loop count, then the mixed load if asked for."""
    prompts = make_prompts(args.num_prompts, args.input_len, args.seed, "main")
    loads = [Load(f"loops={k}", prompts, [k] * args.num_prompts) for k in args.loops]
    if args.mixed:
        mixed = make_prompts(args.num_prompts, args.input_len, args.seed, "mixed")
        cycle = [args.loops[i % len(args.loops)] for i in range(args.num_prompts)]
        loads.append(Load("mixed", mixed, list(cycle)))
    return loads


def warmup_load(load: Load, seed: int) -> Load:
    """A few requests shaped like `load` (same loops) on prompts of their own."""
    count = min(WARMUP_REQUESTS, len(load.prompts))
    length = len(load.prompts[0])
    return Load(
        f"{load.label} warm-up",
        make_prompts(count, length, seed, f"warmup:{load.label}"),
        load.loops[:count],
    )


def request_body(
    model: str, prompt: list[int], output_len: int, loops: int | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if loops is not None:
        body["loops"] = loops
    return body


# ---------------------------------------------------------------- streaming


async def stream_request(http: httpx.AsyncClient, body: dict[str, Any]) -> RequestResult:
    """Send one streamed completion; a chunk with choices marks a token arrival (as in vLLM)."""
    result = RequestResult(loops=body.get("loops"), prompt_tokens=len(body["prompt"]))
    start = last = time.perf_counter()
    chunks = 0
    usage: dict[str, Any] | None = None
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:500]}"
                return result
            async for line in response.aiter_lines():
                event = parse_sse_line(line)
                if event is None or event is DONE:
                    continue
                now = time.perf_counter()
                if event.get("choices"):
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
                usage = event.get("usage") or usage
    except (httpx.HTTPError, LoopserveError, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.e2el = time.perf_counter() - start
    result.output_tokens = usage["completion_tokens"] if usage else chunks
    result.prompt_tokens = usage["prompt_tokens"] if usage else result.prompt_tokens
    result.success = chunks > 0
    result.error = "" if chunks else "no tokens streamed"
    return result


async def run_load(
    url: str,
    api_key: str | None,
    model: str,
    load: Load,
    output_len: int,
    concurrency: int,
    progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """All of the load's requests, at most `concurrency` in flight; returns (results, seconds)."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(600.0, connect=30.0)
    async with httpx.AsyncClient(
        base_url=url, headers=auth_headers(api_key), limits=limits, timeout=timeout
    ) as http:
        with tqdm(
            total=len(load.prompts), desc=load.label, unit="req", disable=not progress
        ) as bar:

            async def one(prompt: list[int], loops: int | None) -> RequestResult:
                async with gate:
                    result = await stream_request(
                        http, request_body(model, prompt, output_len, loops)
                    )
                bar.update(1)
                return result

            start = time.perf_counter()
            results = await asyncio.gather(
                *(one(p, k) for p, k in zip(load.prompts, load.loops, strict=True))
            )
            return list(results), time.perf_counter() - start


# ---------------------------------------------------------------- aggregation


def latency_metrics(results: list[RequestResult]) -> dict[str, float | None]:
    """TTFT, TPOT, ITL and end-to-end latency statistics over successful requests."""
    done = [r for r in results if r.success]
    metrics: dict[str, float | None] = {}
    metrics |= report.latency_stats("ttft", [r.ttft for r in done])
    metrics |= report.latency_stats("tpot", [t for r in done if (t := r.tpot) is not None])
    metrics |= report.latency_stats("itl", [gap for r in done for gap in r.itl])
    metrics |= report.latency_stats("e2el", [r.e2el for r in done])
    return metrics


def summarize_load(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """vLLM bench serve's headline metrics for one load that took `duration` seconds."""
    done = [r for r in results if r.success]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        **latency_metrics(results),
    }


def by_loops(results: list[RequestResult]) -> dict[str, dict[str, Any]]:
    """Latency per loop count inside a mixed load: what each k pays when batched with others."""
    counts = dict.fromkeys(r.loops for r in results)
    return {
        str(k): {
            "completed": sum(r.success for r in results if r.loops == k),
            **latency_metrics([r for r in results if r.loops == k]),
        }
        for k in counts
    }


def ratios(runs: list[dict[str, Any]], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """loopserve / baseline per run for throughput, median TTFT and median ITL (None if n/a)."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return [
        {"label": run["label"], **{k: ratio(run[k], baseline[k]) for k in RATIO_KEYS}}
        for run in runs
    ]


# ---------------------------------------------------------------- driver


def measure(
    url: str, api_key: str | None, model: str, load: Load, args: argparse.Namespace
) -> dict[str, Any]:
    """Warm up, then run one load; a load in which nothing completed is an error."""
    warm = warmup_load(load, args.seed)
    asyncio.run(
        run_load(
            url,
            api_key,
            model,
            warm,
            min(args.output_len, WARMUP_OUTPUT_LEN),
            args.concurrency,
            progress=False,
        )
    )
    results, duration = asyncio.run(
        run_load(url, api_key, model, load, args.output_len, args.concurrency)
    )
    failures = [r.error for r in results if not r.success]
    if failures:
        print(f"{load.label}: {len(failures)} failed, e.g. {failures[0]}", file=sys.stderr)
    if len(failures) == len(results):
        raise BenchError(f"{load.label}: every request failed, e.g. {failures[0]}")
    loops = "mixed" if load.label == "mixed" else load.loops[0]
    run = {"label": load.label, "loops": loops, **summarize_load(results, duration)}
    if load.label == "mixed":
        run["by_loops"] = by_loops(results)
    return run


def check_lengths(card: dict[str, Any], args: argparse.Namespace) -> None:
    limit = card.get("max_model_len")
    if limit and args.input_len + args.output_len > limit:
        raise BenchError(
            f"--input-len {args.input_len} + --output-len {args.output_len} exceeds "
            f"{card['id']}'s max_model_len={limit}"
        )


def run_baseline(args: argparse.Namespace, loads: list[Load]) -> dict[str, Any]:
    """The first fixed load's prompts against the baseline server, with no `loops` field."""
    url = args.baseline_url.rstrip("/")
    card = model_card(url, args.baseline_api_key)
    check_lengths(card, args)
    load = Load("baseline", loads[0].prompts, [None] * len(loads[0].prompts))
    run = measure(url, args.baseline_api_key, card["id"], load, args)
    return run | {"loops": None, "url": url, "model": card["id"]}


def main(args: argparse.Namespace, url: str, loads: list[Load]) -> int:
    """Measure `loads` (from `plan_loads`) on `url`, then the baseline; write serve.json."""
    card = model_card(url, args.api_key)
    check_loops(card, args.loops)
    check_lengths(card, args)
    runs = [measure(url, args.api_key, card["id"], load, args) for load in loads]
    result: dict[str, Any] = {"config": _config(args, url, card), "runs": runs}
    if args.baseline_url:
        baseline = run_baseline(args, loads)
        result["ratios"] = ratios(runs, baseline)
        runs.append(baseline)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "serve.json", result)
    print(report.format_table(runs, TABLE))
    if "ratios" in result:
        print("\nloopserve / baseline")
        print(report.format_table(result["ratios"], ("label", *RATIO_KEYS)))
    print(f"wrote {out / 'serve.json'}", file=sys.stderr)
    return 0


def _config(args: argparse.Namespace, url: str, card: dict[str, Any]) -> dict[str, Any]:
    return {
        "url": url,
        "model": card["id"],
        "loops": args.loops,
        "mixed": args.mixed,
        "num_prompts": args.num_prompts,
        "concurrency": args.concurrency,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "seed": args.seed,
        "baseline_url": args.baseline_url,
    }
