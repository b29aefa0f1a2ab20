"""The `loopserve` command: serve, default-model, complete, chat, bench."""

from __future__ import annotations

import argparse
import os
import sys

from loopserve.server.loop_plan import LoopPlanError, parse_block


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from loopserve.server.app import ServerSettings, create_app
    from loopserve.server.engine import EngineConfig, LoopEngine, build_plan, read_hf_config

    config = EngineConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        loop_block=parse_block(args.loop_block) if args.loop_block else None,
        max_loops=args.max_loops,
        default_loops=args.default_loops,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager,
        max_num_seqs=args.max_num_seqs,
    )
    # Resolve the model and check the loop plan before opening the port: a bad plan is a
    # start-up error, not a server that answers 503 forever.
    config.model = config.model_path()
    build_plan(config, read_hf_config(config.model))
    api_key = args.api_key or os.environ.get("LOOPSERVE_API_KEY")
    app = create_app(lambda: LoopEngine.start(config), ServerSettings(api_key=api_key))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
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

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument("--model", help="HF checkpoint directory or hub id (default: embedded)")
    serve.add_argument("--served-model-name")
    serve.add_argument(
        "--loop-block", help="START:END, 0-indexed, END exclusive (default: middle 4)"
    )
    serve.add_argument("--max-loops", type=int, default=4)
    serve.add_argument("--default-loops", type=int, default=1)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (or LOOPSERVE_API_KEY)"
    )
    serve.add_argument("--max-model-len", type=int)
    serve.add_argument("--max-num-seqs", type=int)
    serve.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"]
    )
    serve.add_argument("--tensor-parallel-size", type=int, default=1)
    serve.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True
    )
    serve.add_argument("--enforce-eager", action="store_true")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)

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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LoopPlanError as error:
        print(f"loopserve: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
