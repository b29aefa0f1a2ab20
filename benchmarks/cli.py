"""`loopserve bench accuracy` and `loopserve bench serve`."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_bench_parser(sub: argparse._SubParsersAction, func: Callable) -> None:
    bench = sub.add_parser("bench", help="accuracy vs FLOPs, and serving performance")
    bench.set_defaults(func=func)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("loopserve bench: not built yet")
