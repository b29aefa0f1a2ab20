"""`loopserve bench accuracy`: exact-match accuracy against forward FLOPs per token, per loop count.

Every loop count answers the same deterministic items greedily through the HTTP API, so the
accuracy differences are the loops' alone, and two loop counts are compared item by item
(exact McNemar test, paired interval of the difference). Each cell carries its guessing
baseline and the share of answers in the answer's form, so a format failure is not read as a
reasoning failure. FLOPs come from the server's FLOPs model (`loopserve.server.flops`); a
probe request checks that the server bills exactly that, and that torch's flop counter on the
unrolled model (meta tensors, sliding windows applied) counts the same, before any load is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm

from loopserve.benchmarks import plots, report, stats
from loopserve.benchmarks.cli import BenchError, check_loops, model_card
from loopserve.benchmarks.flops_check import checkpoint_config, counted_flops
from loopserve.benchmarks.tasks import (
    ITERATE_TASKS,
    TASKS,
    Example,
    family,
    generate,
    guess_baseline,
    load_dataset,
    max_answer_tokens,
    parse_answer,
    score,
)
from loopserve.clients.client import AsyncLoopserveClient
from loopserve.server.flops import FlopsModel, ModelShape
from loopserve.server.loop_plan import LoopPlan

DEFAULT_N = 200
MEAN_TASK = "mean"
COLUMNS = (
    "task",
    "family",
    "loops",
    "n",
    "correct",
    "accuracy",
    "ci95_low",
    "ci95_high",
    "guess_baseline",
    "format_ok_rate",
    "flops_per_token",
    "mean_context_tokens",
)
PAIRED_COLUMNS = (
    "task",
    "loops_a",
    "loops_b",
    "n",
    "only_a",
    "only_b",
    "diff",
    "ci95_low",
    "ci95_high",
    "p_value",
)


@dataclass(frozen=True)
class Outcome:
    """One graded completion (a line of items.jsonl), with the server's own accounting.

    `item` indexes the example within its task, so the same item pairs up across loop counts;
    `answer` is the parsed answer (None: not in the answer's form), `gold` the right one.
    """

    task: str
    item: int
    loops: int
    output: str
    answer: str | None
    gold: str
    correct: bool
    prompt_tokens: int
    completion_tokens: int
    total_flops: int | None  # as billed by the server; None where it was not reported


@dataclass(frozen=True)
class Measurement:
    """Everything one accuracy run produced, for `bench accuracy` and `bench scan` alike."""

    model: str
    flops: FlopsModel
    outcomes: list[Outcome]
    rows: list[dict[str, Any]]
    families: list[dict[str, Any]]
    paired: list[dict[str, Any]]


# ---------------------------------------------------------------- inputs


def suite_examples(tasks: list[str], n: int, shots: int, seed: int) -> list[Example]:
    """`n` seeded items of each task, task after task."""
    return [ex for t in tasks for ex in generate(t, n, shots=shots, seed=seed)]


def load_examples(args: argparse.Namespace) -> list[Example]:
    """The suite's seeded items, or a JSONL dataset (capped per task only if --n is given)."""
    if not args.dataset:
        return suite_examples(args.tasks, args.n or DEFAULT_N, args.shots, args.seed)
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


def flops_model(card: dict[str, Any], model_path: str) -> FlopsModel:
    """The server's FLOPs model: checkpoint shape from `model_path`, loop plan from /v1/models."""
    from loopserve.server.engine import read_hf_config

    config = read_hf_config(model_path)
    if config.get("num_hidden_layers") != card["num_layers"]:
        raise BenchError(
            f"--model {model_path} has {config.get('num_hidden_layers')} layers but the server's "
            f"model has {card['num_layers']}: pass the served checkpoint as --model"
        )
    start, end = card["loop_block"]
    plan = LoopPlan(card["num_layers"], start, end, card["max_loops"], card["default_loops"])
    return FlopsModel(ModelShape.from_hf_config(config), plan)


def request_flops(flops: FlopsModel, loops: int, prompt_tokens: int, completion_tokens: int) -> int:
    """Forward FLOPs of one single-choice request, as the server bills it in usage.total_flops."""
    return sum(flops.request(loops, prompt_tokens, completion_tokens))


# ---------------------------------------------------------------- requests


def items_per_task(examples: list[Example]) -> int | str:
    """Items per task as run, for labels: `--n`, or fewer in a finite family (`iterate`)."""
    counts = sorted(set(Counter(e.task for e in examples).values()))
    return counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def item_indices(examples: list[Example]) -> list[int]:
    """Each example's index within its task, the key that pairs items across loop counts."""
    seen: dict[str, int] = {}
    indices = []
    for example in examples:
        indices.append(seen.get(example.task, 0))
        seen[example.task] = indices[-1] + 1
    return indices


async def _complete(
    client: AsyncLoopserveClient, model_id: str, example: Example, loops: int, item: int
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
    except openai.APIStatusError as error:
        raise BenchError(
            f"{example.task} item {item}, loops={loops}: HTTP {error.status_code}: {error.message}"
        ) from None
    usage = response.usage
    if usage is None or not response.choices:
        raise BenchError("the server answered without usage or choices: is it loopserve?")
    text = response.choices[0].text
    return Outcome(
        task=example.task,
        item=item,
        loops=loops,
        output=text,
        answer=parse_answer(example.task, text),
        gold=example.answer,
        correct=score(text, example.answer),
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_flops=usage.total_flops,
    )


async def _probe(
    client: AsyncLoopserveClient,
    model_id: str,
    example: Example,
    loops: int,
    flops: FlopsModel,
    model_path: str,
) -> None:
    """One request whose billed FLOPs must equal our model's and torch's independent count."""
    got = await _complete(client, model_id, example, loops, -1)
    tokens = got.prompt_tokens + got.completion_tokens
    ours = request_flops(flops, loops, got.prompt_tokens, got.completion_tokens)
    counted = counted_flops(checkpoint_config(model_path), flops.plan, loops, tokens)
    if not got.total_flops == ours == counted:
        raise BenchError(
            f"FLOPs mismatch at loops={loops}, {tokens} tokens: the server billed "
            f"{got.total_flops}, the FLOPs model gives {ours}, torch's flop counter on the "
            f"unrolled reference {counted}; pass the served checkpoint as --model"
        )


async def collect(
    url: str,
    api_key: str | None,
    model_id: str,
    examples: list[Example],
    loops: list[int],
    concurrency: int,
    flops: FlopsModel,
    model_path: str,
) -> list[Outcome]:
    """Every (example, loop count) pair, at most `concurrency` requests in flight."""
    indexed = list(zip(examples, item_indices(examples), strict=True))
    jobs = [(ex, k, i) for k in loops for ex, i in indexed]
    gate = asyncio.Semaphore(concurrency)
    async with AsyncLoopserveClient(url, api_key=api_key, timeout=600) as client:
        await _probe(client, model_id, examples[0], loops[-1], flops, model_path)
        with tqdm(total=len(jobs), desc="bench accuracy", unit="req") as bar:

            async def one(example: Example, k: int, item: int) -> Outcome:
                async with gate:
                    outcome = await _complete(client, model_id, example, k, item)
                bar.update(1)
                return outcome

            return list(await asyncio.gather(*(one(*job) for job in jobs)))


# ---------------------------------------------------------------- aggregation


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if not values or None in values else sum(values) / len(values)


def task_row(
    task: str, loops: int, outcomes: list[Outcome], baseline: float | None, flops: FlopsModel
) -> dict[str, Any]:
    """Accuracy with its Wilson interval, baselines, and FLOPs/token at the mean context."""
    n = len(outcomes)
    correct = sum(o.correct for o in outcomes)
    context = sum(o.prompt_tokens for o in outcomes) / n
    low, high = stats.wilson_interval(correct, n)
    return {
        "task": task,
        "family": family(task),
        "loops": loops,
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "ci95_low": low,
        "ci95_high": high,
        "guess_baseline": baseline,
        # Only the suite's tasks have a known answer form (digit, letter, word, symbol).
        "format_ok_rate": sum(o.answer is not None for o in outcomes) / n
        if task in TASKS + ITERATE_TASKS
        else None,
        "flops_per_token": flops.per_token(loops, round(context)),
        "mean_context_tokens": context,
    }


def family_weights(tasks: list[str]) -> dict[str, float]:
    """Weight of each task in the headline: families count equally, tasks equally within one."""
    groups: dict[str, list[str]] = {}
    for task in tasks:
        groups.setdefault(family(task), []).append(task)
    return {t: 1 / (len(groups) * len(members)) for members in groups.values() for t in members}


def weighted_row(name: str, loops: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of task rows weighted by `family_weights`, with its normal interval."""
    weights = family_weights([r["task"] for r in rows])
    low, high = stats.weighted_mean_interval(
        [(weights[r["task"]], r["correct"], r["n"]) for r in rows]
    )

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows]
        return None if None in values else sum(weights[r["task"]] * r[key] for r in rows)

    return {
        "task": name,
        "family": name,
        "loops": loops,
        "n": sum(r["n"] for r in rows),
        "correct": sum(r["correct"] for r in rows),
        "accuracy": mean("accuracy"),
        "ci95_low": low,
        "ci95_high": high,
        "guess_baseline": mean("guess_baseline"),
        "format_ok_rate": mean("format_ok_rate"),
        "flops_per_token": round(mean("flops_per_token")),
        "mean_context_tokens": mean("mean_context_tokens"),
    }


def summarize(
    outcomes: list[Outcome], examples: list[Example], flops: FlopsModel
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows, families): rows per (task, loops) then one headline mean row per loop count.

    The headline is the mean over task families, so the many variable-assignment tasks do
    not outweigh copying or arithmetic; `families` holds each family's own mean.
    """
    baselines: dict[str, list[float | None]] = {}
    for example in examples:
        baselines.setdefault(example.task, []).append(guess_baseline(example))
    groups: dict[tuple[str, int], list[Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault((outcome.task, outcome.loops), []).append(outcome)
    rows = [
        task_row(task, k, group, _mean_or_none(baselines[task]), flops)
        for (task, k), group in groups.items()
    ]
    loop_counts = list(dict.fromkeys(r["loops"] for r in rows))
    families = [
        weighted_row(name, k, [r for r in rows if r["loops"] == k and r["family"] == name])
        for name in dict.fromkeys(r["family"] for r in rows)
        for k in loop_counts
    ]
    means = [weighted_row(MEAN_TASK, k, [r for r in rows if r["loops"] == k]) for k in loop_counts]
    return rows + means, families


def paired_tests(outcomes: list[Outcome], loops: list[int]) -> list[dict[str, Any]]:
    """Per task and pair of loop counts: exact McNemar p-value and the paired difference."""
    correct = {(o.task, o.loops, o.item): o.correct for o in outcomes}
    items: dict[str, list[int]] = {}
    for o in outcomes:
        if o.loops == loops[0]:
            items.setdefault(o.task, []).append(o.item)
    paired = []
    for task, indices in items.items():
        for a, b in combinations(loops, 2):
            only_a = sum(correct[task, a, i] and not correct[task, b, i] for i in indices)
            only_b = sum(correct[task, b, i] and not correct[task, a, i] for i in indices)
            diff, low, high = stats.paired_diff_interval(only_a, only_b, len(indices))
            paired.append(
                {
                    "task": task,
                    "loops_a": a,
                    "loops_b": b,
                    "n": len(indices),
                    "only_a": only_a,
                    "only_b": only_b,
                    "diff": diff,
                    "ci95_low": low,
                    "ci95_high": high,
                    "p_value": stats.mcnemar_exact(only_a, only_b),
                }
            )
    return paired


# ---------------------------------------------------------------- running


def model_path_of(model: str | None) -> str:
    from loopserve.server.default_model import resolve_model

    return resolve_model(model)


def measure(
    url: str,
    api_key: str | None,
    model: str | None,
    examples: list[Example],
    loops: list[int],
    concurrency: int,
) -> Measurement:
    """The accuracy suite against one server: graded items, rows, family means, paired tests."""
    card = model_card(url, api_key)
    check_loops(card, loops)
    path = model_path_of(model)
    flops = flops_model(card, path)
    outcomes = asyncio.run(
        collect(url, api_key, card["id"], examples, loops, concurrency, flops, path)
    )
    rows, families = summarize(outcomes, examples, flops)
    return Measurement(card["id"], flops, outcomes, rows, families, paired_tests(outcomes, loops))


def markdown_table(rows: list[dict[str, Any]], paired: list[dict[str, Any]]) -> str:
    """Per task: baseline, accuracy [95% CI] and format-ok rate per k, and each k against the
    first one (difference [95% CI], exact McNemar p); the headline mean last."""
    loops = list(dict.fromkeys(r["loops"] for r in rows))
    cell = {(r["task"], r["loops"]): r for r in rows}
    tests = {(p["task"], p["loops_b"]): p for p in paired if p["loops_a"] == loops[0]}

    def number(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    head = ["task", "guess"] + [f"k={k} acc [95% CI] (format ok)" for k in loops]
    head += [f"k={k} - k={loops[0]} [95% CI], p" for k in loops[1:]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for task in dict.fromkeys(r["task"] for r in rows):
        first = cell[task, loops[0]]
        name = f"**{task}** (over families)" if task == MEAN_TASK else task
        cells = [name, number(first["guess_baseline"], 2)]
        for k in loops:
            r = cell[task, k]
            fmt = "" if r["format_ok_rate"] is None else f" ({number(r['format_ok_rate'], 2)})"
            cells.append(
                f"{number(r['accuracy'])} [{number(r['ci95_low'], 2)}, "
                f"{number(r['ci95_high'], 2)}]{fmt}"
            )
        for k in loops[1:]:
            t = tests.get((task, k))
            cells.append(
                "-"
                if t is None
                else f"{t['diff']:+.3f} [{t['ci95_low']:+.2f}, {t['ci95_high']:+.2f}], "
                f"p={t['p_value']:.2g}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    flops = " | ".join(f"{cell[MEAN_TASK, k]['flops_per_token'] / 1e9:.3f}" for k in loops)
    lines.append(f"| GFLOPs/token (mean) | | {flops} |" + " |" * (len(loops) - 1))
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, config: dict[str, Any], result: Measurement) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "config": config,
        "rows": result.rows,
        "families": result.families,
        "paired": result.paired,
    }
    report.write_json(out / "accuracy.json", data)
    report.write_csv(out / "accuracy.csv", result.rows, COLUMNS)
    report.write_csv(out / "paired.csv", result.paired, PAIRED_COLUMNS)
    (out / "accuracy.md").write_text(markdown_table(result.rows, result.paired))
    with (out / "items.jsonl").open("w") as f:
        f.writelines(json.dumps(asdict(o)) + "\n" for o in result.outcomes)
    plots.plot_accuracy(out / "accuracy.png", result.rows, result.families, plots.title(config))


def describe(
    result: Measurement, model: str | None, dtype: str, examples: list[Example], **settings: Any
) -> dict[str, Any]:
    """A run's config: what a reader needs to label (model, block, dtype, precision) or redo it."""
    from loopserve.benchmarks.cli import weights_precision

    path = model_path_of(model)
    return {
        "model": result.model,
        "model_path": path,
        "precision": weights_precision(path),
        "dtype": dtype,
        "loop_plan": result.flops.plan.to_dict(),
        "tasks": list(dict.fromkeys(e.task for e in examples)),
        **settings,
    }


def main(args: argparse.Namespace, url: str, examples: list[Example]) -> int:
    """Run the benchmark on `examples` (from `load_examples`, read before any server starts)."""
    result = measure(url, args.api_key, args.model, examples, args.loops, args.concurrency)
    out = Path(args.out)
    config = describe(
        result,
        args.model,
        args.dtype,
        examples,
        url=url,
        loops=args.loops,
        n=None if args.dataset and not args.n else items_per_task(examples),
        shots=args.shots,
        seed=args.seed,
        dataset=args.dataset,
        concurrency=args.concurrency,
    )
    write_outputs(out, config, result)
    print(report.format_table(result.rows, COLUMNS))
    print(report.format_table(result.paired, PAIRED_COLUMNS))
    print(
        f"wrote {out / 'accuracy.json'}, accuracy.csv, paired.csv, items.jsonl, accuracy.png",
        file=sys.stderr,
    )
    return 0
