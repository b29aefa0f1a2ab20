"""`loopserve bench ...`: argument parsing and shared plumbing for every benchmark command.

Arguments are validated at parse time (argparse exits 2 with the flag named) so a typo fails
before a server starts; problems only the server can reveal (a loop count above its max_loops,
an unreachable URL) raise `BenchError`, which `run` prints as one line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

DEFAULT_OUT = "bench-results"


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked; the message says what to change."""


# ---------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def loop_list(text: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4]: distinct loop counts >= 1, in the order given."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated loop counts, e.g. 1,2,4")
    values: list[int] = []
    for part in parts:
        if not part.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"loop counts must be integers, got {part!r}")
        value = int(part)
        if value < 1:
            raise argparse.ArgumentTypeError(f"loop counts must be >= 1, got {value}")
        if value not in values:
            values.append(value)
    return values


def block_list(text: str) -> list[tuple[int, int]]:
    """`9:13,11:15` -> [(9, 13), (11, 15)]: loop blocks, START:END each, in the order given."""
    from loopserve.server.loop_plan import LoopPlanError, parse_block

    blocks = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            start, end = parse_block(part)
        except LoopPlanError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if not 0 <= start < end:
            raise argparse.ArgumentTypeError(f"loop block {part!r} needs 0 <= START < END")
        if (start, end) not in blocks:
            blocks.append((start, end))
    if not blocks:
        raise argparse.ArgumentTypeError("expected comma-separated blocks, e.g. 9:13,11:15")
    return blocks


def task_list(text: str) -> list[str]:
    """`all` (the text suite), `iterate` (its family) or comma-separated task names, checked
    against the task suite."""
    from loopserve.benchmarks.tasks import ITERATE_TASKS, TASKS

    if text.strip() == "all":
        return list(TASKS)
    if text.strip() == "iterate":
        return list(ITERATE_TASKS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS + ITERATE_TASKS]
    if unknown or not names:
        bad = ", ".join(unknown) or repr(text)
        valid = ", ".join(TASKS + ITERATE_TASKS)
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad}; valid: all, iterate, {valid}")
    return list(dict.fromkeys(names))


def default_tasks(model: str | None) -> list[str]:
    """The looped reference model knows only the iterated map; any other model gets `all`."""
    from loopserve.server.default_model import reference_model_path, resolve_model

    if Path(resolve_model(model)).resolve() == reference_model_path():
        return task_list("iterate")
    return task_list("all")


# ---------------------------------------------------------------- parsers


def _add_started_server(parser: argparse.ArgumentParser) -> None:
    """The checkpoint, and how to start `loopserve serve` on it when the command starts one."""
    parser.add_argument(
        "--model",
        help="checkpoint served (default: the embedded model); "
        "read for its FLOPs shape, and served when --url is omitted",
    )
    started = parser.add_argument_group("server started when --url is omitted")
    started.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="passed to `loopserve serve`; with --url, say what the server runs (plot title)",
    )
    started.add_argument(
        "--server-args",
        default="",
        help="more `loopserve serve` options, e.g. '--max-model-len 2048'",
    )


def _add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for results")


def _add_loops(parser: argparse.ArgumentParser, loops: str) -> None:
    parser.add_argument(
        "--loops",
        type=loop_list,
        default=loop_list(loops),
        help=f"comma-separated loop counts (default: {loops})",
    )


def _add_server(parser: argparse.ArgumentParser) -> None:
    """Target server, or the checkpoint and loop plan of one started here."""
    parser.add_argument("--url", help="loopserve server to measure (default: start one here)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LOOPSERVE_API_KEY"),
        help="bearer key (default: $LOOPSERVE_API_KEY)",
    )
    _add_started_server(parser)
    parser.add_argument("--loop-block", help="START:END passed to `loopserve serve`")
    parser.add_argument(
        "--max-loops",
        type=positive_int,
        help="passed to `loopserve serve` (default: the largest --loops)",
    )


def _add_common(parser: argparse.ArgumentParser, loops: str) -> None:
    """Target server (or one started here), loop counts and output folder."""
    _add_loops(parser, loops)
    parser.add_argument(
        "--concurrency", type=positive_int, default=16, help="requests in flight at once"
    )
    _add_out(parser)
    _add_server(parser)


def _add_suite(parser: argparse.ArgumentParser, n_default: int | None, n_help: str) -> None:
    """Which task-suite items to run (`bench accuracy`, `bench scan`)."""
    parser.add_argument(
        "--tasks",
        type=task_list,
        help="comma-separated task names, all (the text suite) or iterate "
        "(default: iterate for looped-reference, else all)",
    )
    parser.add_argument("--n", type=positive_int, default=n_default, help=n_help)
    parser.add_argument("--shots", type=non_negative_int, default=5)


def _add_accuracy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("accuracy", help="exact-match accuracy vs FLOPs/token per loop count")
    _add_common(p, "1,2,3,4")
    _add_suite(p, None, "examples per task (default: 200; with --dataset: all of it)")
    p.add_argument(
        "--dataset",
        help="JSONL of {prompt, answer[, task]} instead of the suite "
        "(--tasks and --shots are then ignored)",
    )


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="overlay several runs on one accuracy-vs-FLOPs plot")
    p.add_argument("runs", nargs="+", help="output folders of `bench accuracy`/`scan`/`lm-eval`")
    p.add_argument("--labels", help="comma-separated label per run (default: from each config)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for compare.png/.csv/.json/.md")


def _add_scan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan", help="accuracy per loop block and loop count (one server per block), heatmap"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--blocks", type=block_list, help="START:END,... blocks to loop")
    where.add_argument(
        "--block-size", type=positive_int, help="scan the whole model with blocks of this size"
    )
    p.add_argument(
        "--stride", type=positive_int, default=2, help="step between block starts (--block-size)"
    )
    _add_loops(p, "1,2,3")
    _add_suite(p, 20, "examples per task and cell (default: 20)")
    p.add_argument("--concurrency", type=positive_int, default=16)
    _add_out(p)
    _add_started_server(p)


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose", help="per-layer logit lens, norms and updates on the unrolled reference"
    )
    _add_loops(p, "1,2,3,4")
    p.add_argument(
        "--tasks",
        type=task_list,
        default=task_list("var_assign_d0_math,induction_copy,preschool_math"),
        help="tasks the prompts come from",
    )
    p.add_argument("--n", type=positive_int, default=2, help="prompts per task")
    p.add_argument("--shots", type=non_negative_int, default=5)
    p.add_argument("--loop-block", help="START:END (default: the middle 4 layers)")
    p.add_argument("--model", help="checkpoint (default: the embedded model)")
    _add_out(p)


def _add_lm_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm-eval", help="lm-evaluation-harness at each loop count (`loops` in every request)"
    )
    p.add_argument(
        "--tasks",
        required=True,
        help="lm-eval task names (comma-separated), or a task YAML file or folder of them",
    )
    _add_loops(p, "1,2,3")
    p.add_argument("--limit", type=positive_int, help="documents per task")
    p.add_argument("--num-concurrent", type=positive_int, default=4)
    _add_out(p)
    _add_server(p)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="`vllm bench serve` per loop count, mixed depths, FLOPs, vs a stock server"
    )
    _add_common(p, "1,2,4")
    p.add_argument(
        "--mixed",
        action="store_true",
        help="also run a load whose request i uses loops[i %% len(loops)]",
    )
    p.add_argument("--num-prompts", type=positive_int, default=200)
    p.add_argument("--input-len", type=positive_int, default=128, help="prompt tokens")
    p.add_argument("--output-len", type=positive_int, default=128, help="generated tokens")
    p.add_argument(
        "--baseline-url",
        help="a stock vLLM (or any OpenAI-compatible) server, sent the same prompts and no loops",
    )
    p.add_argument("--baseline-api-key", default=os.environ.get("OPENAI_API_KEY"))


def add_bench_parser(sub: argparse._SubParsersAction, func: Callable) -> None:
    bench = sub.add_parser("bench", help="accuracy vs FLOPs, and serving performance")
    bench.set_defaults(func=func)
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    _add_accuracy(kinds)
    _add_serve(kinds)
    _add_compare(kinds)
    _add_scan(kinds)
    _add_diagnose(kinds)
    _add_lm_eval(kinds)


# ---------------------------------------------------------------- server plumbing


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def model_card(url: str, api_key: str | None) -> dict[str, Any]:
    """The first entry of GET /v1/models: model id, context length and (loopserve) loop plan."""
    response = httpx.get(f"{url}/v1/models", headers=auth_headers(api_key), timeout=30)
    if response.status_code != 200:
        raise BenchError(f"GET {url}/v1/models: HTTP {response.status_code}: {response.text}")
    data = response.json().get("data") or []
    if not data:
        raise BenchError(f"GET {url}/v1/models lists no model")
    return data[0]


def check_loops(card: dict[str, Any], loops: list[int]) -> None:
    """Fail before any load if a requested loop count is one the server would reject."""
    if "max_loops" not in card:
        raise BenchError(f"model {card.get('id')!r} has no loop plan: is this a loopserve server?")
    too_many = [k for k in loops if k > card["max_loops"]]
    if too_many:
        raise BenchError(
            f"--loops {','.join(map(str, too_many))} exceeds the server's "
            f"max_loops={card['max_loops']}; restart it with a larger --max-loops"
        )


def weights_precision(model_path: str) -> str:
    """How the checkpoint's weights were stored, for plot titles (a dequantised GGUF says so)."""
    from loopserve.server.default_model import GGUF_FILE, default_model_path
    from loopserve.server.engine import read_hf_config

    if Path(model_path).resolve() == Path(default_model_path()).resolve():
        return f"weights from {GGUF_FILE} (4-bit, dequantised)"
    config = read_hf_config(model_path)
    return f"weights {config.get('torch_dtype') or config.get('dtype', 'unknown dtype')}"


def serve_args(args: argparse.Namespace, *, loop_block: str | None, max_loops: int) -> list[str]:
    """`loopserve serve` options for a server this command starts (stable flags only)."""
    options = ["--max-loops", str(max_loops), "--dtype", args.dtype]
    if args.model:
        options += ["--model", args.model]
    if loop_block:
        options += ["--loop-block", loop_block]
    return options + shlex.split(args.server_args)


@contextmanager
def started_server(options: list[str], log: Path) -> Iterator[str]:
    """A `loopserve serve` with `options`, logging to `log`, stopped on exit."""
    from loopserve.server.launcher import start_server

    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting loopserve serve {' '.join(options)} (log: {log})", file=sys.stderr)
    try:
        server = start_server(options, str(log))
    except (RuntimeError, TimeoutError) as error:
        raise BenchError(f"the server did not start; see {log}") from error
    try:
        yield server.url
    finally:
        server.stop()


@contextmanager
def server_url(args: argparse.Namespace) -> Iterator[str]:
    """`--url` as given, or a `loopserve serve` started for this run and stopped after it."""
    if args.url:
        yield args.url.rstrip("/")
        return
    options = serve_args(
        args, loop_block=args.loop_block, max_loops=args.max_loops or max(args.loops)
    )
    with started_server(options, Path(args.out) / "server.log") as url:
        yield url


def _prepare(args: argparse.Namespace) -> Callable[[str], int]:
    """The chosen benchmark with its inputs read first, so a bad --dataset or lm-eval --tasks
    starts no server."""
    if args.bench_command == "accuracy":
        from loopserve.benchmarks import accuracy

        examples = accuracy.load_examples(args)
        return lambda url: accuracy.main(args, url, examples)
    if args.bench_command == "lm-eval":
        from loopserve.benchmarks import lmeval

        tasks, include = lmeval.task_spec(args.tasks)
        return lambda url: lmeval.main(args, url, tasks, include)
    from loopserve.benchmarks import serve

    return lambda url: serve.main(args, url)


# Commands that run on their own (no single server, or none at all), by module.
_STANDALONE = {"compare": "compare", "scan": "scan", "diagnose": "diagnose"}


def run(args: argparse.Namespace) -> int:
    """Dispatch `bench ...`; a BenchError or unreachable server exits 2 with a line."""
    try:
        if getattr(args, "tasks", "") is None:  # accuracy and scan: the model decides
            args.tasks = default_tasks(args.model)
        if args.bench_command in _STANDALONE:
            from importlib import import_module

            module = import_module(f"loopserve.benchmarks.{_STANDALONE[args.bench_command]}")
            return module.main(args)
        bench = _prepare(args)
        with server_url(args) as url:
            return bench(url)
    except BenchError as error:
        print(f"loopserve bench: {error}", file=sys.stderr)
        return 2
    except httpx.TransportError as error:
        print(f"loopserve bench: cannot reach the server: {error!r}", file=sys.stderr)
        return 2
