"""`loopserve bench lm-eval`: lm-evaluation-harness tasks at each loop count, with FLOPs.

lm-eval's `local-completions` model sends no generation kwargs with loglikelihood requests,
so a per-request `loops` would never reach multiple-choice tasks. Each k therefore gets its
own server started with `--default-loops k`: every request, of every kind, runs at k. The
per-document results (`--log_samples`) give the paired tests and the mean context length
at which FLOPs/token are reported, so the output has the same files and columns as
`bench accuracy` (and `bench compare` reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from loopserve.benchmarks import accuracy, report
from loopserve.benchmarks.accuracy import Measurement, Outcome
from loopserve.benchmarks.cli import BenchError, model_card, serve_args, started_server
from loopserve.benchmarks.tasks import Example

# Per-document metrics read as "correct", in order of preference.
METRICS = ("acc", "exact_match")


def task_spec(text: str) -> tuple[list[str], str | None]:
    """(task names, include path): a YAML file or folder of task configs, or task names."""
    import yaml

    path = Path(text)
    if not path.exists():
        return [t.strip() for t in text.split(",") if t.strip()], None
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    names = []
    for file in files:
        config = yaml.safe_load(file.read_text()) or {}
        if isinstance(config, dict) and "task" in config:
            names.append(config["task"])
    if not names:
        raise BenchError(f"--tasks {text}: no lm-eval task config (a YAML with `task:`) found")
    return names, str(path if path.is_dir() else path.parent)


def run_lm_eval(
    url: str,
    model_id: str,
    model_path: str,
    tasks: list[str],
    include: str | None,
    args: argparse.Namespace,
    out: Path,
) -> None:
    """`python -m lm_eval` against `url`; a failure stops the run with lm-eval's own error."""
    command = [
        sys.executable, "-m", "lm_eval",
        "--model", "local-completions",
        "--model_args",
        f"model={model_id},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={model_path},num_concurrent={args.num_concurrent},max_retries=1",
        "--tasks", ",".join(tasks),
        "--output_path", str(out),
        "--log_samples",
        "--seed", str(args.seed),
    ]  # fmt: skip
    if include:
        command += ["--include_path", include]
    if args.limit:
        command += ["--limit", str(args.limit)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.setdefault("OPENAI_API_KEY", "unused")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    (out / "lm_eval.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise BenchError(f"lm_eval exited {result.returncode}: {result.stderr[-2000:]}")


def read_outcomes(out: Path, loops: int, tokenizer) -> tuple[list[Outcome], list[Example]]:
    """Per-document outcomes from lm-eval's sample logs (context length from the tokenizer)."""
    outcomes, examples = [], []
    for file in sorted(out.rglob("samples_*.jsonl")):
        task = file.name.removeprefix("samples_").rsplit("_", 1)[0]
        for line in file.read_text().splitlines():
            sample = json.loads(line)
            metric = next((m for m in METRICS if m in sample), None)
            if metric is None:
                raise BenchError(f"{file}: no per-document metric among {', '.join(METRICS)}")
            context = sample["arguments"]["gen_args_0"]["arg_0"]
            tokens = len(tokenizer(context)["input_ids"])
            gold = str(sample.get("target", ""))
            outcomes.append(
                Outcome(
                    task=task,
                    item=sample["doc_id"],
                    loops=loops,
                    output=json.dumps(sample.get("filtered_resps")),
                    answer=None,
                    gold=gold,
                    correct=sample[metric] == 1,
                    prompt_tokens=tokens,
                    completion_tokens=0,
                    total_flops=None,
                )
            )
            examples.append(Example(task, context, gold))
    if not outcomes:
        raise BenchError(f"lm_eval wrote no sample logs under {out}")
    return outcomes, examples


def main(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    tasks, include = task_spec(args.tasks)
    path = accuracy.model_path_of(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = Path(args.out)
    outcomes: list[Outcome] = []
    examples: list[Example] = []
    for k in args.loops:
        folder = out / "lm_eval" / f"loops_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        options = serve_args(args, loop_block=args.loop_block, max_loops=max(args.loops))
        options += ["--default-loops", str(k)]
        with started_server(options, folder / "server.log") as url:
            card = model_card(url, None)
            flops = accuracy.flops_model(card, path)
            run_lm_eval(url, card["id"], path, tasks, include, args, folder)
        got, seen = read_outcomes(folder, k, tokenizer)
        outcomes += got
        examples = examples or seen  # the same documents at every k
    rows, families = accuracy.summarize(outcomes, examples, flops)
    result = Measurement(
        card["id"], flops, outcomes, rows, families, accuracy.paired_tests(outcomes, args.loops)
    )
    config = accuracy.describe(
        result, args.model, args.dtype, examples, loops=args.loops, n=args.limit,
        lm_eval_tasks=tasks, seed=args.seed,
    )  # fmt: skip
    accuracy.write_outputs(out, config, result)
    print(report.format_table(rows, accuracy.COLUMNS))
    print(report.format_table(result.paired, accuracy.PAIRED_COLUMNS))
    print(f"wrote {out / 'accuracy.json'}, accuracy.csv, paired.csv, accuracy.png", file=sys.stderr)
    return 0
