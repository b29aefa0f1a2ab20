"""Where a looped step's time goes: per load, milliseconds per model step by piece.

Same offline load as `engine_throughput` (default batch 16, 64 in / 64 out, vLLM's
defaults). In the worker, loopserve's pieces are wrapped with wall-clock timers, which
measure cost on the CPU, where every op runs synchronously:
compiled segments (prelude, block: every pass, coda), vLLM's attention kernel
(every layer and pass; a pass's planes see only the requests that run it),
the loop step, the rest of the model's forward (embedding, final norm, row gathers),
and the rest of the engine step (sampling, scheduling, inputs). Times are exclusive:
a piece's time excludes the timed pieces inside it. Each load runs once untimed first;
its wall time is printed too, since it includes compiling the segments the load is the
first to need.

    python -m loopserve.benchmarks.step_profile [--model DIR] [--dtype bfloat16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

from loopserve.benchmarks.engine_throughput import _prompts, _stop, load_parser

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# apply_model ships the instrumenting functions to the worker by pickling them.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

PIECES = (
    "prelude segment",
    "block segment (every pass)",
    "coda segment",
    "attention kernel",
    "loop step",
    "rest of the forward",
)
LOADS = {"k=1": (1,), "k=2": (2,), "k=4": (4,), "mixed {1,2,4}": (1, 2, 4)}


class _Timers:
    """Exclusive wall time per name, for nested timed calls."""

    def __init__(self) -> None:
        self.exclusive: dict[str, float] = {}
        self.steps = 0
        self._children = [0.0]

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._children.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = self._children.pop()
                self._children[-1] += elapsed
                self.exclusive[name] = self.exclusive.get(name, 0.0) + elapsed - inner

        return timed

    def reset(self) -> None:
        self.exclusive, self.steps = {}, 0


def _instrument(model: Any) -> None:
    """Wrap the looped model's pieces with timers (runs in the worker)."""
    from vllm.model_executor.layers.attention import Attention

    from loopserve.server import loop_passes

    timers = model.loopserve_timers = _Timers()
    decoder = model.looped_decoder()
    forward = timers.wrap("rest of the forward", model.forward)

    def counted_forward(*args: Any, **kwargs: Any) -> Any:
        timers.steps += 1
        return forward(*args, **kwargs)

    model.forward = counted_forward
    block = decoder.block
    layers = decoder.view.layers
    names = {"LoopPrelude": "prelude segment", "LoopCoda": "coda segment"}
    for i, layer in enumerate(layers):
        if layer in decoder.segments:
            layers[i] = timers.wrap(names[type(layer).__name__], layer)
    block.segment = timers.wrap("block segment (every pass)", block.segment)
    loop_passes.loop_step_triton = timers.wrap("loop step", loop_passes.loop_step_triton)
    impls = {id(m.impl): m.impl for m in model.modules() if isinstance(m, Attention)}
    for impl in impls.values():
        impl.forward = timers.wrap("attention kernel", impl.forward)


def _reset(model: Any) -> None:
    model.loopserve_timers.reset()


def _read(model: Any) -> dict[str, Any]:
    timers = model.loopserve_timers
    return {"steps": timers.steps, "exclusive": dict(timers.exclusive)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from loopserve.server.engine import EngineConfig, vllm_engine_kwargs

    prompts = _prompts(args.batch, args.input_len, args.seed)
    config = EngineConfig(
        model=args.model,
        max_loops=4,
        dtype=args.dtype,
        max_model_len=1024,
        enable_prefix_caching=False,
    )
    kwargs, _ = vllm_engine_kwargs(config)
    llm = LLM(**kwargs)
    llm.apply_model(_instrument)
    table: dict[str, dict[str, float]] = {}
    for load, cycle in LOADS.items():
        params = [
            SamplingParams(
                temperature=0.0,
                max_tokens=args.output_len,
                ignore_eos=True,
                extra_args={"loops": cycle[i % len(cycle)]},
            )
            for i in range(args.batch)
        ]
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)  # warm-up: compiles what it needs
        warm_up = time.perf_counter() - start
        llm.apply_model(_reset)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        [read] = llm.apply_model(_read)
        steps = read["steps"]
        row = {piece: 1e3 * read["exclusive"].get(piece, 0.0) / steps for piece in PIECES}
        row["rest of the engine step"] = 1e3 * wall / steps - sum(row.values())
        row["step (total)"] = 1e3 * wall / steps
        row["steps"] = steps
        row["warm-up run, s"] = warm_up
        row["timed run, s"] = wall
        table[load] = row
    _stop(llm)
    return {"config": {**vars(args), "model": kwargs["model"]}, "ms_per_step": table}


def markdown(result: dict[str, Any]) -> str:
    table = result["ms_per_step"]
    loads = list(table)
    lines = [
        "| ms per step | " + " | ".join(loads) + " |",
        "|---|" + "---:|" * len(loads),
    ]
    for piece in [*PIECES, "rest of the engine step", "step (total)"]:
        cells = " | ".join(f"{table[load][piece]:.2f}" for load in loads)
        lines.append(f"| {piece} | {cells} |")
    for name in ("steps", "warm-up run, s", "timed run, s"):
        cells = " | ".join(f"{table[load][name]:.4g}" for load in loads)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    args = load_parser(__doc__.splitlines()[0]).parse_args()
    # Under `python -m` this module is __main__; vLLM pickles the functions it ships to
    # the worker by reference, which needs them under their importable name.
    from loopserve.benchmarks import step_profile

    result = step_profile.run(args)
    print(markdown(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
