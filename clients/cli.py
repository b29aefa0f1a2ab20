"""`loopserve complete` and `loopserve chat`: stream a server's answer to the terminal."""

from __future__ import annotations

import argparse
import sys

from loopserve.clients.client import LoopserveClient, LoopserveError


def _client(args: argparse.Namespace) -> LoopserveClient:
    return LoopserveClient(args.url, api_key=args.api_key)


def complete(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            for chunk in client.stream_complete(
                args.prompt,
                loops=args.loops,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
            ):
                for choice in chunk.choices:
                    sys.stdout.write(choice.text)
                    sys.stdout.flush()
    except LoopserveError as error:
        print(f"\nloopserve: {error}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
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
            reply = []
            try:
                for chunk in client.stream_chat(
                    messages,
                    loops=args.loops,
                    max_tokens=args.max_tokens,
                    temperature=args.temperature,
                ):
                    for choice in chunk.choices:
                        text = choice.delta.content or ""
                        reply.append(text)
                        sys.stdout.write(text)
                        sys.stdout.flush()
            except LoopserveError as error:
                print(f"loopserve: {error}", file=sys.stderr)
                return 1
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
