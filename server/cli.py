"""The `loopserve` command: serve, default-model, complete, chat, bench."""

from __future__ import annotations

import argparse
import os
import sys

from loopserve.server.loop_plan import LoopPlanError, parse_block

SERVE_DESCRIPTION = """Serve the OpenAI-compatible API: vLLM's own server (every `vllm serve` option
is accepted) on the looped model, plus `loops` per request. Defaults differ from vLLM's
in three places: the embedded model, --host 127.0.0.1 and the served model name (the
checkpoint's folder name)."""
MIDDLEWARE = "loopserve.server.http_guard.LoopserveMiddleware"
PLUGIN = "loopserve"


def serve_parser() -> argparse.ArgumentParser:
    """vLLM's `serve` parser with loopserve's defaults and loop options added."""
    from loopserve.server.vllm_http_hooks import vllm_serve_parser

    parser = vllm_serve_parser("loopserve serve", SERVE_DESCRIPTION)
    parser.set_defaults(model=None, host="127.0.0.1", port=8000)
    loop = parser.add_argument_group("loopserve", "How the looped model loops.")
    loop.add_argument(
        "--loop-block",
        help="START:END, 0-indexed, END exclusive (default: the checkpoint's loop_plan, "
        "else the middle 4 layers)",
    )
    loop.add_argument("--max-loops", type=int, help="(default: the checkpoint's loop_plan, else 4)")
    loop.add_argument(
        "--default-loops",
        type=int,
        help="loops of a request without (default: the checkpoint's loop_plan, else 1)",
    )
    loop.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="larger request bodies get 413 (declared or chunked)",
    )
    return parser


def _serve(argv: list[str]) -> int:
    # vLLM loads endpoint plugins only when VLLM_PLUGINS names them; the engine processes
    # inherit it, so the general plugin (the model hooks) must stay named too.
    named = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    os.environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*named, PLUGIN]))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from loopserve.server.engine import EngineConfig, vllm_engine_kwargs
    from loopserve.server.vllm_http_hooks import run_vllm_serve

    args = serve_parser().parse_args(argv)
    # Resolve the model and check the loop plan before vLLM starts: a bad plan is a
    # start-up error with a one-line message.
    config = EngineConfig(
        model=args.model_tag or args.model,
        served_model_name=args.served_model_name[0] if args.served_model_name else None,
        loop_block=parse_block(args.loop_block) if args.loop_block else None,
        max_loops=args.max_loops,
        default_loops=args.default_loops,
    )
    kwargs, info = vllm_engine_kwargs(config)
    args.model, args.model_tag = info.path, None
    args.served_model_name = [info.name, *(args.served_model_name or [])[1:]]
    args.hf_overrides = {**(args.hf_overrides or {}), **kwargs["hf_overrides"]}
    if not args.api_key and os.environ.get("LOOPSERVE_API_KEY"):
        args.api_key = [os.environ["LOOPSERVE_API_KEY"]]
    if MIDDLEWARE not in args.middleware:
        args.middleware.append(MIDDLEWARE)
    run_vllm_serve(args)
    return 0


def _default_model(args: argparse.Namespace) -> int:
    from loopserve.server.default_model import default_model_path

    print(default_model_path())
    return 0


def _complete(args: argparse.Namespace) -> int:
    from loopserve.clients.cli import complete

    return complete(args)


def _chat(args: argparse.Namespace) -> int:
    from loopserve.clients.cli import chat

    return chat(args)


def _bench(args: argparse.Namespace) -> int:
    from loopserve.benchmarks.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    # Listed for help only: main() hands `serve` to vLLM's own parser (serve_parser).
    sub.add_parser("serve", help="serve the OpenAI-compatible API (vLLM's server; see serve -h)")

    default_model = sub.add_parser("default-model", help="prepare and print the embedded model")
    default_model.set_defaults(func=_default_model)

    for name, func, text in (
        ("complete", _complete, "complete a prompt against a server, streaming"),
        ("chat", _chat, "chat with a server (interactive on a terminal)"),
    ):
        client = sub.add_parser(name, help=text)
        client.add_argument("--url", default="http://127.0.0.1:8000")
        client.add_argument("--loops", type=int)
        client.add_argument("--max-tokens", type=int, default=128)
        client.add_argument("--temperature", type=float, default=0.0)
        client.add_argument("--api-key", default=os.environ.get("LOOPSERVE_API_KEY"))
        if name == "complete":
            client.add_argument("prompt")
        client.set_defaults(func=func)

    from loopserve.benchmarks.cli import add_bench_parser

    add_bench_parser(sub, _bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["serve"]:
            return _serve(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except LoopPlanError as error:
        print(f"loopserve: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
