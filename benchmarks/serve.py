"""`loopserve bench serve`: `vllm bench serve` per loop count, plus what is about loops.

Every load is one run of vLLM's own serving benchmark (`vllm.benchmarks.serve.benchmark`:
its random dataset, request function, ready check, warm-ups and metrics), so each number
is what `vllm bench serve` reports and can sit beside a stock vLLM run. loopserve adds:
- one load per loop count, `loops` sent in the benchmark's extra body (`--extra-body`);
- a mixed-depth load, request i at loops[i % len(loops)] (vLLM's per-request overrides),
  with each loop count's latency inside it;
- FLOPs per request, from the server's FLOPs model on the server-reported token counts;
- the ratio against a baseline server (stock vLLM), which is sent no `loops` at all.

Fixed-k loads and the baseline share one prompt set (the per-depth prefix-cache salt
keeps fixed-k loads apart); the mixed load gets its own, so that its (prompt, loops)
pairs do not hit KV cached by the fixed loads.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopserve.benchmarks import report
from loopserve.benchmarks.cli import BenchError, auth_headers, check_loops, model_card

if TYPE_CHECKING:
    from vllm.benchmarks.datasets import SampleRequest

    from loopserve.server.flops import FlopsModel

WARMUPS = 2
READY_CHECK_SECONDS = 10  # the server already answered /v1/models
LATENCIES = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (50, 90, 99)
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
    "mean_flops_per_request",
)


@dataclass(frozen=True)
class Load:
    """One measured load: vLLM sample requests, and the loop count each is sent with.

    `loops` is one count for the whole load (sent in the extra body), a list with one
    count per request (the mixed load), or None: no `loops` field at all (the baseline).
    """

    label: str
    requests: list[SampleRequest]
    loops: int | list[int] | None

    def loops_of(self, index: int) -> int | None:
        return self.loops[index] if isinstance(self.loops, list) else self.loops


def sample_requests(args: argparse.Namespace, tokenizer: Any, seed: int) -> list[SampleRequest]:
    """`--num-prompts` prompts of `--input-len` tokens from vLLM's random dataset."""
    from vllm.benchmarks.datasets import get_samples
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    dataset = parser.parse_args(
        [
            "--dataset-name=random",
            f"--num-prompts={args.num_prompts}",
            f"--random-input-len={args.input_len}",
            f"--random-output-len={args.output_len}",
            f"--seed={seed}",
        ]
    )
    return get_samples(dataset, tokenizer)


def plan_loads(args: argparse.Namespace, tokenizer: Any) -> list[Load]:
    """One load per fixed loop count, then the mixed load if asked for."""
    requests = sample_requests(args, tokenizer, args.seed)
    loads = [Load(f"loops={k}", requests, k) for k in args.loops]
    if args.mixed:
        cycle = [args.loops[i % len(args.loops)] for i in range(args.num_prompts)]
        loads.append(Load("mixed", sample_requests(args, tokenizer, args.seed + 1), cycle))
    return loads


async def run_vllm_benchmark(
    url: str, api_key: str | None, model: str, tokenizer: Any, load: Load, concurrency: int
) -> dict[str, Any]:
    """vLLM's `benchmark` on one load: greedy, exactly `--output-len` tokens per request."""
    from vllm.benchmarks.serve import TaskType, benchmark

    extra_body: dict[str, Any] = {"temperature": 0.0}
    requests = load.requests
    if isinstance(load.loops, int):
        extra_body["loops"] = load.loops
    elif isinstance(load.loops, list):
        requests = [
            replace(request, request_overrides={"loops": k})
            for request, k in zip(requests, load.loops, strict=True)
        ]
    return await benchmark(
        task_type=TaskType.GENERATION,
        endpoint_type="openai",
        api_url=f"{url}/v1/completions",
        base_url=url,
        model_id=model,
        model_name=model,
        tokenizer=tokenizer,
        input_requests=requests,
        logprobs=None,
        request_rate=float("inf"),
        burstiness=1.0,
        disable_tqdm=False,
        num_warmups=WARMUPS,
        profile=False,
        selected_percentile_metrics=list(LATENCIES),
        selected_percentiles=[float(p) for p in PERCENTILES],
        ignore_eos=True,
        goodput_config_dict={},
        max_concurrency=concurrency,
        lora_modules=None,
        extra_headers=auth_headers(api_key),
        extra_body=extra_body,
        ready_check_timeout_sec=READY_CHECK_SECONDS,
    )


# ---------------------------------------------------------------- what is about loops


def request_flops(load: Load, result: dict[str, Any], flops: FlopsModel) -> list[int | None]:
    """Each request's forward FLOPs (None for a failed one) at the tokens the server reported."""
    return [
        None if error else sum(flops.request(load.loops_of(i), prompt, output))
        for i, (error, prompt, output) in enumerate(
            zip(result["errors"], result["input_lens"], result["output_lens"], strict=True)
        )
    ]


def by_loops(load: Load, result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Latency per loop count inside a mixed load: what each k pays batched with others.

    vLLM's definitions: TPOT is a request's (latency - TTFT) / (output tokens - 1).
    """
    groups: dict[int, list[int]] = {}
    for i, error in enumerate(result["errors"]):
        if not error:
            groups.setdefault(load.loops_of(i), []).append(i)
    metrics = {}
    for k, done in groups.items():
        ttft = [result["ttfts"][i] for i in done]
        e2el = [result["latencies"][i] for i in done]
        outputs = [result["output_lens"][i] for i in done]
        tpot = [(e - t) / (n - 1) for t, e, n in zip(ttft, e2el, outputs, strict=True) if n > 1]
        itl = [gap for i in done for gap in result["itls"][i]]
        metrics[str(k)] = {"completed": len(done)}
        for name, seconds in zip(LATENCIES, (ttft, tpot, itl, e2el), strict=True):
            metrics[str(k)] |= report.latency_stats(name, seconds, PERCENTILES)
    return metrics


def ratios(runs: list[dict[str, Any]], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """loopserve / baseline per run for throughput, median TTFT and median ITL (None if n/a)."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return [
        {"label": run["label"], **{k: ratio(run[k], baseline[k]) for k in RATIO_KEYS}}
        for run in runs
    ]


# ---------------------------------------------------------------- driver

# Per-request lists in vLLM's result, left out of serve.json as `vllm bench serve` leaves
# them out without --save-detailed.
DETAIL = (
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "latencies",
    "start_times",
    "queue_times",
    "generated_texts",
    "errors",
)


def measure(
    url: str,
    api_key: str | None,
    model: str,
    tokenizer: Any,
    load: Load,
    args: argparse.Namespace,
    flops: FlopsModel | None,
) -> dict[str, Any]:
    """One load through vLLM's benchmark; a load in which nothing completed is an error."""
    try:
        result = asyncio.run(
            run_vllm_benchmark(url, api_key, model, tokenizer, load, args.concurrency)
        )
    except ValueError as error:  # vLLM's "Initial test run failed"
        raise BenchError(f"{load.label}: {error}") from None
    failures = [error for error in result["errors"] if error]
    if failures:
        print(f"{load.label}: {len(failures)} failed, e.g. {failures[0]}", file=sys.stderr)
    if not result["completed"]:
        raise BenchError(f"{load.label}: every request failed, e.g. {failures[0]}")
    loops = "mixed" if isinstance(load.loops, list) else load.loops
    run = {"label": load.label, "loops": loops}
    if flops is not None:
        billed = [f for f in request_flops(load, result, flops) if f is not None]
        run |= {"total_flops": sum(billed), "mean_flops_per_request": sum(billed) / len(billed)}
    if isinstance(load.loops, list):
        run["by_loops"] = by_loops(load, result)
    return run | {key: value for key, value in result.items() if key not in DETAIL}


def check_lengths(card: dict[str, Any], args: argparse.Namespace) -> None:
    limit = card.get("max_model_len")
    if limit and args.input_len + args.output_len > limit:
        raise BenchError(
            f"--input-len {args.input_len} + --output-len {args.output_len} exceeds "
            f"{card['id']}'s max_model_len={limit}"
        )


def run_baseline(args: argparse.Namespace, tokenizer: Any, loads: list[Load]) -> dict[str, Any]:
    """The first fixed load's prompts against the baseline server, with no `loops` field."""
    url = args.baseline_url.rstrip("/")
    card = model_card(url, args.baseline_api_key)
    check_lengths(card, args)
    load = Load("baseline", loads[0].requests, None)
    run = measure(url, args.baseline_api_key, card["id"], tokenizer, load, args, None)
    return run | {"url": url, "model": card["id"]}


def main(args: argparse.Namespace, url: str) -> int:
    """Measure every load on `url`, then the baseline; write serve.json."""
    from vllm.tokenizers import get_tokenizer

    from loopserve.benchmarks.accuracy import flops_model, model_path_of

    card = model_card(url, args.api_key)
    check_loops(card, args.loops)
    check_lengths(card, args)
    path = model_path_of(args.model)
    flops = flops_model(card, path)
    tokenizer = get_tokenizer(path)
    loads = plan_loads(args, tokenizer)
    runs = [measure(url, args.api_key, card["id"], tokenizer, load, args, flops) for load in loads]
    result: dict[str, Any] = {"config": _config(args, url, card), "runs": runs}
    if args.baseline_url:
        baseline = run_baseline(args, tokenizer, loads)
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
        "loop_plan": {k: card[k] for k in ("num_layers", "loop_block", "max_loops")},
    }
