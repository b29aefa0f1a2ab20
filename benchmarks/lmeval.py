"""`loopserve bench lm-eval`: lm-evaluation-harness tasks at each loop count, with FLOPs.

One server for every k: lm-eval runs once per k with the `loopserve-completions` model
(`lmeval_model.py`), which puts `loops` in every request, loglikelihood ones included
(lm-eval's own `local-completions` sends generation kwargs only with generate requests).
The per-document results (`--log_samples`) give the paired tests and the mean context length
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
from loopserve.benchmarks.cli import BenchError, check_loops, model_card
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
    loops: int,
    tasks: list[str],
    include: str | None,
    args: argparse.Namespace,
    out: Path,
) -> None:
    """lm-eval's CLI against `url` at `loops`; a failure stops the run with lm-eval's error."""
    command = [
        sys.executable, "-m", "loopserve.benchmarks.lmeval_model",
        "--model", "loopserve-completions",
        "--model_args",
        f"model={model_id},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={model_path},num_concurrent={args.num_concurrent},max_retries=1,"
        f"loops={loops}",
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
    env["OPENAI_API_KEY"] = args.api_key or env.get("OPENAI_API_KEY", "unused")
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


def main(args: argparse.Namespace, url: str, tasks: list[str], include: str | None) -> int:
    from transformers import AutoTokenizer

    path = accuracy.model_path_of(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    card = model_card(url, args.api_key)
    check_loops(card, args.loops)
    flops = accuracy.flops_model(card, path)
    out = Path(args.out)
    outcomes: list[Outcome] = []
    examples: list[Example] = []
    for k in args.loops:
        folder = out / "lm_eval" / f"loops_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        run_lm_eval(url, card["id"], path, k, tasks, include, args, folder)
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
