"""KV held by a request and requests that fit one pool: loopserve by depth vs stock vLLM.

Same checkpoint, dtype and KV space (`VLLM_CPU_KVCACHE_SPACE`, GiB) for both engines,
eager, one engine at a time. Measured with vLLM's own gauges:

- KV held by one running request (prompt `--prompt-len` tokens), per depth: its share
  of the pool (`vllm:kv_cache_usage_perc`); the pools are the same bytes, so the ratio
  to stock's share is the ratio of bytes held (each pool less its null block: < 0.3%);
- requests running at once (`vllm:num_requests_running`, the most seen) for a load of
  `--requests` prompts, 90% at k=1 and 10% at k=K (stock: all plain), each holding
  `--prompt-len + --output-len` tokens;
- the pool's tokens per depth, from loopserve's start-up log line.

    python -m loopserve.benchmarks.kv_capacity [--kv-space 1] [--max-loops 4] [--out F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from typing import Any

_ids = itertools.count()


def gauge(llm: Any, name: str) -> float:
    """A gauge or counter of vLLM's metrics, as the engine last reported it."""
    [value] = [m.value for m in llm.get_metrics() if m.name == name]
    return value


def usage_while_running(llm: Any, prompt_ids: list[int], params: Any) -> float:
    """vLLM's KV usage (share of the pool) while one request runs alone, prefilled."""
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    request_id = f"probe-{next(_ids)}"
    engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt_ids), params)
    for _ in range(3):
        engine.step()
    usage = gauge(llm, "vllm:kv_cache_usage_perc")
    engine.abort_request([request_id])
    while engine.has_unfinished_requests():
        engine.step()
    return usage


def most_running(llm: Any, prompts: list[list[int]], params: list[Any]) -> int:
    """The most requests vLLM runs at once for this load, submitted together."""
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    for prompt, p in zip(prompts, params, strict=True):
        engine.add_request(f"load-{next(_ids)}", TokensPrompt(prompt_token_ids=prompt), p)
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        most = max(most, int(gauge(llm, "vllm:num_requests_running")))
    return most


def run(args: argparse.Namespace) -> dict[str, Any]:
    import random

    from vllm import LLM, SamplingParams

    from loopserve.server.engine import EngineConfig, vllm_engine_kwargs

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_space)
    common = {"dtype": args.dtype, "max_model_len": 1024, "enforce_eager": True}
    kwargs, info = vllm_engine_kwargs(
        EngineConfig(model=args.model, max_loops=args.max_loops, **common)
    )
    K = info.plan.max_loops
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(100, 20000) for _ in range(args.prompt_len)] for _ in range(args.requests)
    ]
    load_loops = [K if i % 10 == 9 else 1 for i in range(args.requests)]

    def params(loops: int | None, max_tokens: int) -> Any:
        extra = {"extra_args": {"loops": loops}} if loops else {}
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra)

    stats = {"disable_log_stats": False}
    stock = LLM(kwargs["model"], seed=0, **common, **stats)
    result: dict[str, Any] = {
        "stock": {
            "usage_one_request": usage_while_running(stock, prompts[0], params(None, 64)),
            "most_running": most_running(
                stock, prompts, [params(None, args.output_len)] * args.requests
            ),
        }
    }
    stock.llm_engine.engine_core.shutdown()
    looped = LLM(**kwargs, **stats)
    result["loopserve"] = {
        "usage_one_request": {
            k: usage_while_running(looped, [k, *prompts[0][1:]], params(k, 64))
            for k in range(1, K + 1)
        },
        "most_running": most_running(
            looped, prompts, [params(k, args.output_len) for k in load_loops]
        ),
    }
    looped.llm_engine.engine_core.shutdown()
    result["config"] = {**vars(args), "model": kwargs["model"], "plan": info.plan.to_dict()}
    return result


def report(result: dict[str, Any]) -> str:
    stock, looped = result["stock"], result["loopserve"]
    plan = result["config"]["plan"]
    lines = [
        "| depth | share of pool held, loopserve | stock vLLM | loopserve / stock | "
        "executed layers / L |",
        "|---|---|---|---|---|",
    ]
    for k, usage in looped["usage_one_request"].items():
        depth = (plan["num_layers"] + (k - 1) * (plan["end"] - plan["start"])) / plan["num_layers"]
        lines.append(
            f"| k={k} | {usage:.4f} | {stock['usage_one_request']:.4f} | "
            f"{usage / stock['usage_one_request']:.3f} | {depth:.3f} |"
        )
    lines += [
        "",
        f"requests running at once ({result['config']['requests']} submitted; loopserve 90% "
        f"k=1, 10% k={plan['max_loops']}): stock {stock['most_running']}, loopserve "
        f"{looped['most_running']} ({looped['most_running'] / stock['most_running']:.2f}x)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: embedded model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-space", type=int, default=1, help="GiB of KV, both engines")
    parser.add_argument("--max-loops", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=50)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args()
    result = run(args)
    print(report(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
