"""GPU check, ready to run on a CUDA host with vLLM installed (`make install` there).

With vLLM's defaults (compiled, CUDA graphs on): k=1 through loopserve == stock vLLM,
and a batch mixing k=1..4 == each request's solo run (greedy, fp32, exact tokens); then
the engine-throughput ratios against stock vLLM at its defaults, in fp32 and bf16.

    python -m loopserve.benchmarks.gpu_check [--model DIR] [--out DIR]

Exits 1 if an exactness check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Question: What is 12 + 7?\nAnswer:",
]


def _greedy(loops: int | None):
    from vllm import SamplingParams

    extra = {"extra_args": {"loops": loops}} if loops else {}
    return SamplingParams(temperature=0.0, max_tokens=24, **extra)


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def exactness(model: str | None) -> dict[str, bool]:
    from vllm import LLM

    from loopserve.server.engine import EngineConfig, vllm_engine_kwargs

    kwargs, _ = vllm_engine_kwargs(EngineConfig(model=model, dtype="float32", max_model_len=1024))
    stock = LLM(kwargs["model"], dtype="float32", max_model_len=1024, seed=0)
    stock_k1 = _tokens(stock.generate(PROMPTS, _greedy(None), use_tqdm=False))
    stock.llm_engine.engine_core.shutdown()
    looped = LLM(**kwargs)
    k1 = _tokens(looped.generate(PROMPTS, _greedy(1), use_tqdm=False))
    loops = [1, 2, 3, 4]
    mixed = _tokens(looped.generate(PROMPTS, [_greedy(k) for k in loops], use_tqdm=False))
    solo = [
        _tokens(looped.generate([p], _greedy(k), use_tqdm=False))[0]
        for p, k in zip(PROMPTS, loops, strict=True)
    ]
    looped.llm_engine.engine_core.shutdown()
    return {"k1_equals_stock": k1 == stock_k1, "mixed_equals_solo": mixed == solo}


def main() -> int:
    from loopserve.benchmarks import engine_throughput

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default="gpu_check")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checks = exactness(args.model)
    print(json.dumps(checks))
    results = {"checks": checks}
    for dtype in ("float32", "bfloat16"):
        bench = argparse.Namespace(
            model=args.model,
            dtype=dtype,
            batch=16,
            input_len=64,
            output_len=64,
            repeats=3,
            seed=0,
            enforce_eager=False,
            out=None,
        )
        results[dtype] = engine_throughput.run(bench)
        print(dtype, json.dumps(results[dtype]["ratios"], indent=2))
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
