"""`loopserve bench accuracy` and `loopserve bench serve`: argument parsing and shared plumbing.

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


def task_list(text: str) -> list[str]:
    """`all` or comma-separated task names, checked against the task suite."""
    from loopserve.benchmarks.tasks import TASKS

    if text.strip() == "all":
        return list(TASKS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        bad = ", ".join(unknown) or repr(text)
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad}; valid: all, {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------- parsers


def _add_common(parser: argparse.ArgumentParser, loops: str) -> None:
    """Target server (or one started here), loop counts and output folder."""
    parser.add_argument("--url", help="loopserve server to measure (default: start one here)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LOOPSERVE_API_KEY"),
        help="bearer key (default: $LOOPSERVE_API_KEY)",
    )
    parser.add_argument(
        "--loops",
        type=loop_list,
        default=loop_list(loops),
        help=f"comma-separated loop counts (default: {loops})",
    )
    parser.add_argument(
        "--concurrency", type=positive_int, default=16, help="requests in flight at once"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for results")
    parser.add_argument(
        "--model",
        help="checkpoint served (default: the embedded model); "
        "read for its FLOPs shape, and served when --url is omitted",
    )
    started = parser.add_argument_group("server started when --url is omitted")
    started.add_argument("--loop-block", help="START:END passed to `loopserve serve`")
    started.add_argument(
        "--max-loops",
        type=positive_int,
        help="passed to `loopserve serve` (default: the largest --loops)",
    )
    started.add_argument(
        "--server-args",
        default="",
        help="more `loopserve serve` options, e.g. '--max-model-len 2048'",
    )


def _add_accuracy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("accuracy", help="exact-match accuracy vs FLOPs/token per loop count")
    _add_common(p, "1,2,3,4")
    p.add_argument(
        "--tasks",
        type=task_list,
        default=task_list("all"),
        help="comma-separated task names, or all",
    )
    p.add_argument(
        "--n", type=positive_int, help="examples per task (default: 200; with --dataset: all of it)"
    )
    p.add_argument("--shots", type=non_negative_int, default=5)
    p.add_argument(
        "--dataset",
        help="JSONL of {prompt, answer[, task]} instead of the suite "
        "(--tasks and --shots are then ignored)",
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="latency and throughput per loop count (vLLM bench style)")
    _add_common(p, "1,2,4")
    p.add_argument(
        "--mixed",
        action="store_true",
        help="also run a load whose request i uses loops[i %% len(loops)]",
    )
    p.add_argument("--num-prompts", type=positive_int, default=200)
    p.add_argument("--input-len", type=positive_int, default=128, help="prompt tokens")
    p.add_argument("--output-len", type=positive_int, default=128, help="generated tokens")
    p.add_argument("--baseline-url", help="another OpenAI-compatible server for the same load")
    p.add_argument("--baseline-api-key", default=os.environ.get("OPENAI_API_KEY"))


def add_bench_parser(sub: argparse._SubParsersAction, func: Callable) -> None:
    bench = sub.add_parser("bench", help="accuracy vs FLOPs, and serving performance")
    bench.set_defaults(func=func)
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    _add_accuracy(kinds)
    _add_serve(kinds)


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


@contextmanager
def server_url(args: argparse.Namespace) -> Iterator[str]:
    """`--url` as given, or a `loopserve serve` started for this run and stopped after it."""
    if args.url:
        yield args.url.rstrip("/")
        return
    from loopserve.server.launcher import start_server

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    serve_args = ["--max-loops", str(args.max_loops or max(args.loops))]
    if args.model:
        serve_args += ["--model", args.model]
    if args.loop_block:
        serve_args += ["--loop-block", args.loop_block]
    serve_args += shlex.split(args.server_args)
    log = out / "server.log"
    print(f"starting loopserve serve {' '.join(serve_args)} (log: {log})", file=sys.stderr)
    try:
        server = start_server(serve_args, str(log))
    except (RuntimeError, TimeoutError) as error:
        raise BenchError(f"the server did not start; see {log}") from error
    try:
        yield server.url
    finally:
        server.stop()


def _prepare(args: argparse.Namespace) -> Callable[[str], int]:
    """The chosen benchmark with its inputs read first, so a bad --dataset starts no server."""
    if args.bench_command == "accuracy":
        from loopserve.benchmarks import accuracy

        examples = accuracy.load_examples(args)
        return lambda url: accuracy.main(args, url, examples)
    from loopserve.benchmarks import serve

    loads = serve.plan_loads(args)
    return lambda url: serve.main(args, url, loads)


def run(args: argparse.Namespace) -> int:
    """Dispatch `bench accuracy|serve`; a BenchError or unreachable server exits 2 with a line."""
    try:
        bench = _prepare(args)
        with server_url(args) as url:
            return bench(url)
    except BenchError as error:
        print(f"loopserve bench: {error}", file=sys.stderr)
        return 2
    except httpx.TransportError as error:
        print(f"loopserve bench: cannot reach the server: {error!r}", file=sys.stderr)
        return 2
