"""`loopserve complete` and `loopserve chat`: stream a server's answer to the terminal.

The answer goes to stdout; what it cost (`usage`: depth, tokens, FLOPs) to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from typing import Any

import openai

from loopserve.clients.client import LoopserveClient
from loopserve.clients.types import LoopUsage

# A server started a moment ago is still loading its model (minutes on a CPU).
WAIT_FOR_SERVER = 300.0
INCLUDE_USAGE = {"include_usage": True}


def _client(args: argparse.Namespace) -> LoopserveClient:
    return LoopserveClient(args.url, api_key=args.api_key, wait=WAIT_FOR_SERVER)


def _cost(usage: LoopUsage | None) -> str:
    if usage is None:
        return "[no usage reported]"
    return (
        f"[loops={usage.loops}, {usage.total_tokens} tokens, {usage.total_flops / 1e9:.3g} GFLOPs]"
    )


def _echo(stream: Iterable[Any], text_of: Callable[[Any], str | None]) -> tuple[str, Any]:
    """Write each chunk's text as it arrives; returns the whole text and the usage."""
    pieces, usage = [], None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(text_of(choice) or "")
            sys.stdout.write(pieces[-1])
            sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces), usage


def complete(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            stream = client.stream_complete(
                args.prompt,
                loops=args.loops,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                stream_options=INCLUDE_USAGE,
            )
            _, usage = _echo(stream, lambda choice: choice.text)
    except openai.OpenAIError as error:
        print(f"\nloopserve: {error}", file=sys.stderr)
        return 1
    print(_cost(usage), file=sys.stderr)
    return 0


def chat(args: argparse.Namespace) -> int:
    """One turn per input line; interactive prompt only when stdin is a terminal."""
    interactive = sys.stdin.isatty()
    messages: list[dict[str, str]] = []
    with _client(args) as client:
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            try:
                stream = client.stream_chat(
                    messages,
                    loops=args.loops,
                    max_tokens=args.max_tokens,
                    temperature=args.temperature,
                    stream_options=INCLUDE_USAGE,
                )
                reply, usage = _echo(stream, lambda choice: choice.delta.content)
            except openai.OpenAIError as error:
                print(f"loopserve: {error}", file=sys.stderr)
                return 1
            print(_cost(usage), file=sys.stderr)
            messages.append({"role": "assistant", "content": reply})
