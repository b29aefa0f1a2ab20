"""`loopserve bench accuracy`: exact-match accuracy against forward FLOPs per token, per loop count.

Every loop count answers the same deterministic items greedily through the HTTP API, so the
accuracy differences are the loops' alone. FLOPs come from the server's own FLOPs model
(`loopserve.server.flops`) on the checkpoint's shape and the server's loop plan; a probe request
checks that this reproduces the server's `usage.total_flops` before any load is sent, so a
`--model` that is not the served one fails fast instead of mislabelling the plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loopserve.benchmarks import report
from loopserve.benchmarks.cli import BenchError, check_loops, model_card
from loopserve.benchmarks.tasks import (
    Example,
    generate,
    load_dataset,
    max_answer_tokens,
    score,
)
from loopserve.clients.client import AsyncLoopserveClient, LoopserveError
from loopserve.server.flops import FlopsModel, ModelShape
from loopserve.server.loop_plan import LoopPlan

DEFAULT_N = 200
MEAN_TASK = "mean"
COLUMNS = (
    "task",
    "loops",
    "n",
    "correct",
    "accuracy",
    "ci95_low",
    "ci95_high",
    "flops_per_token",
    "mean_context_tokens",
)


@dataclass(frozen=True)
class Outcome:
    """One graded completion, with the server's own token and FLOPs accounting."""

    task: str
    loops: int
    index: int
    answer: str
    completion: str
    correct: bool
    prompt_tokens: int
    completion_tokens: int
    total_flops: int


# ---------------------------------------------------------------- inputs


def load_examples(args: argparse.Namespace) -> list[Example]:
    """The suite's seeded items, or a JSONL dataset (capped per task only if --n is given)."""
    if not args.dataset:
        n = args.n or DEFAULT_N
        return [ex for t in args.tasks for ex in generate(t, n, shots=args.shots, seed=args.seed)]
    try:
        examples = load_dataset(args.dataset)
    except (OSError, ValueError) as error:
        raise BenchError(f"--dataset: {error}") from None
    if args.n:
        examples = _first_per_task(examples, args.n)
    if not examples:
        raise BenchError(f"--dataset {args.dataset} holds no examples")
    return examples


def _first_per_task(examples: list[Example], n: int) -> list[Example]:
    counts: dict[str, int] = {}
    kept = []
    for example in examples:
        counts[example.task] = counts.get(example.task, 0) + 1
        if counts[example.task] <= n:
            kept.append(example)
    return kept


def flops_model(card: dict[str, Any], model: str | None) -> FlopsModel:
    """The server's FLOPs model: checkpoint shape from `model`, loop plan from /v1/models."""
    from loopserve.server.engine import read_hf_config

    if model is None:
        from loopserve.server.default_model import default_model_path

        model = str(default_model_path())
    config = read_hf_config(model)
    if config.get("num_hidden_layers") != card["num_layers"]:
        raise BenchError(
            f"--model {model} has {config.get('num_hidden_layers')} layers but the server's "
            f"model has {card['num_layers']}: pass the served checkpoint as --model"
        )
    start, end = card["loop_block"]
    plan = LoopPlan(card["num_layers"], start, end, card["max_loops"], card["default_loops"])
    return FlopsModel(ModelShape.from_hf_config(config), plan)


def request_flops(flops: FlopsModel, loops: int, prompt_tokens: int, completion_tokens: int) -> int:
    """Forward FLOPs of one single-choice request, as the server bills it in usage.total_flops."""
    return sum(flops.request(loops, prompt_tokens, completion_tokens))


# ---------------------------------------------------------------- requests


async def _complete(
    client: AsyncLoopserveClient, model_id: str, example: Example, loops: int, index: int
) -> Outcome:
    """One greedy completion, graded; a rejected request stops the run rather than skew it."""
    try:
        response = await client.complete(
            example.prompt,
            loops=loops,
            model=model_id,
            max_tokens=max_answer_tokens(example.task),
            temperature=0.0,
        )
    except LoopserveError as error:
        raise BenchError(f"{example.task} item {index}, loops={loops}: {error}") from None
    usage = response.usage
    if usage is None or not response.choices:
        raise BenchError("the server answered without usage or choices: is it loopserve?")
    text = response.choices[0].text
    return Outcome(
        example.task,
        loops,
        index,
        example.answer,
        text,
        score(text, example.answer),
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_flops,
    )


async def _probe(
    client: AsyncLoopserveClient, model_id: str, example: Example, loops: int, flops: FlopsModel
) -> None:
    """One request whose billed FLOPs must equal ours, or every FLOPs column would be wrong."""
    got = await _complete(client, model_id, example, loops, -1)
    ours = request_flops(flops, loops, got.prompt_tokens, got.completion_tokens)
    if ours != got.total_flops:
        raise BenchError(
            f"FLOPs mismatch: the server billed {got.total_flops}, the harness computes {ours}; "
            "pass the served checkpoint as --model"
        )


async def collect(
    url: str,
    api_key: str | None,
    model_id: str,
    examples: list[Example],
    loops: list[int],
    concurrency: int,
    flops: FlopsModel,
) -> list[Outcome]:
    """Every (example, loop count) pair, at most `concurrency` requests in flight."""
    jobs = [(ex, k, i) for k in loops for i, ex in enumerate(examples)]
    gate = asyncio.Semaphore(concurrency)
    async with AsyncLoopserveClient(url, api_key=api_key, timeout=600) as client:
        await _probe(client, model_id, examples[0], loops[-1], flops)
        with tqdm(total=len(jobs), desc="bench accuracy", unit="req") as bar:

            async def one(example: Example, k: int, index: int) -> Outcome:
                async with gate:
                    outcome = await _complete(client, model_id, example, k, index)
                bar.update(1)
                return outcome

            return list(await asyncio.gather(*(one(*job) for job in jobs)))


# ---------------------------------------------------------------- aggregation


def task_row(task: str, loops: int, outcomes: list[Outcome], flops: FlopsModel) -> dict[str, Any]:
    """Accuracy with its Wilson interval, and the FLOPs/token at the mean context length."""
    n = len(outcomes)
    correct = sum(o.correct for o in outcomes)
    context = sum(o.prompt_tokens for o in outcomes) / n
    low, high = report.wilson_interval(correct, n)
    return {
        "task": task,
        "loops": loops,
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "ci95_low": low,
        "ci95_high": high,
        "flops_per_token": flops.per_token(loops, round(context)),
        "mean_context_tokens": context,
    }


def mean_row(loops: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over tasks, so a large task does not dominate the headline curve."""
    count = len(rows)
    low, high = report.mean_interval([(r["correct"], r["n"]) for r in rows])
    return {
        "task": MEAN_TASK,
        "loops": loops,
        "n": sum(r["n"] for r in rows),
        "correct": sum(r["correct"] for r in rows),
        "accuracy": sum(r["accuracy"] for r in rows) / count,
        "ci95_low": low,
        "ci95_high": high,
        "flops_per_token": round(sum(r["flops_per_token"] for r in rows) / count),
        "mean_context_tokens": sum(r["mean_context_tokens"] for r in rows) / count,
    }


def summarize(outcomes: list[Outcome], flops: FlopsModel) -> list[dict[str, Any]]:
    """Rows per (task, loops) in first-seen order, then one mean row per loop count."""
    groups: dict[tuple[str, int], list[Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault((outcome.task, outcome.loops), []).append(outcome)
    rows = [task_row(task, k, group, flops) for (task, k), group in groups.items()]
    loop_counts = list(dict.fromkeys(r["loops"] for r in rows))
    return rows + [mean_row(k, [r for r in rows if r["loops"] == k]) for k in loop_counts]


# ---------------------------------------------------------------- outputs


def write_outputs(
    out: Path, config: dict[str, Any], rows: list[dict[str, Any]], outcomes: list[Outcome]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "accuracy.json", {"config": config, "rows": rows})
    report.write_csv(out / "accuracy.csv", rows, COLUMNS)
    with (out / "accuracy_samples.jsonl").open("w") as f:
        f.writelines(json.dumps(asdict(o)) + "\n" for o in outcomes)
    report.plot_accuracy(out / "accuracy.png", rows, f"{config['model']}: accuracy vs FLOPs/token")


def main(args: argparse.Namespace, url: str, examples: list[Example]) -> int:
    """Run the benchmark on `examples` (from `load_examples`, read before any server starts)."""
    card = model_card(url, args.api_key)
    check_loops(card, args.loops)
    flops = flops_model(card, args.model)
    outcomes = asyncio.run(
        collect(url, args.api_key, card["id"], examples, args.loops, args.concurrency, flops)
    )
    rows = summarize(outcomes, flops)
    config = {
        "url": url,
        "model": card["id"],
        "loop_plan": flops.plan.to_dict(),
        "loops": args.loops,
        "tasks": list(dict.fromkeys(e.task for e in examples)),
        "n": args.n or (None if args.dataset else DEFAULT_N),
        "shots": args.shots,
        "seed": args.seed,
        "dataset": args.dataset,
        "concurrency": args.concurrency,
    }
    out = Path(args.out)
    write_outputs(out, config, rows, outcomes)
    print(report.format_table(rows, COLUMNS))
    print(f"wrote {out / 'accuracy.json'}, accuracy.csv, accuracy.png", file=sys.stderr)
    return 0
