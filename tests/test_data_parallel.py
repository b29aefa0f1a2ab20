"""Data parallelism: `loopserve serve --data-parallel-size 2`, two replicas behind one
endpoint, each looping its own requests (vLLM's CPU backend, one core per replica).

A tiny 6-layer Llama; concurrent requests of mixed depth through the one HTTP endpoint
each equal the unrolled oracle, report their depth in `usage`, and both replicas
served some of them.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import one_core_per_rank
from test_architectures import LONG_PROMPT, PROMPTS
from tiny_models import NUM_LAYERS

pytestmark = pytest.mark.slow

BLOCK = (1, 5)
MAX_LOOPS = 3


@pytest.fixture(scope="module")
def dp2(tiny_checkpoint, tmp_path_factory):
    from loopserve.server.launcher import start_server
    from loopserve.server.loop_plan import LoopPlan
    from loopserve.server.reference import UnrolledReference

    path = tiny_checkpoint("LlamaForCausalLM")
    args = ["--model", path, "--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]
    args += [
        "--loop-block",
        f"{BLOCK[0]}:{BLOCK[1]}",
        "--max-loops",
        str(MAX_LOOPS),
        "--data-parallel-size",
        "2",
    ]
    with one_core_per_rank():
        server = start_server(args, str(tmp_path_factory.mktemp("dp2") / "server.log"))
    yield server.url, UnrolledReference(path, LoopPlan.for_model(NUM_LAYERS, BLOCK, MAX_LOOPS))
    server.stop()


def test_mixed_depths_through_one_endpoint_equal_the_oracle(dp2):
    """Breakage caught: a replica that drops `loops` or runs without loopserve's hooks."""
    url, reference = dp2
    prompts = [*PROMPTS, LONG_PROMPT] * 2
    loops = [1, 2, 3, 2, 3, 3, 1, 2, 3, 1]

    async def one(client: httpx.AsyncClient, prompt: str, k: int) -> dict:
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "loops": k}
        response = await client.post("/v1/completions", json={**body, "return_token_ids": True})
        assert response.status_code == 200, response.text
        return response.json()

    async def main() -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            return await asyncio.gather(
                *(one(client, p, k) for p, k in zip(prompts, loops, strict=True))
            )

    results = asyncio.run(main())
    for k, result in zip(loops, results, strict=True):
        [choice] = result["choices"]
        assert result["usage"]["loops"] == k
        expected = reference.greedy_choices(choice["prompt_token_ids"], k, choice["token_ids"])
        assert choice["token_ids"] == expected, k
    engines = {
        line.split('engine="')[1].split('"')[0]
        for line in httpx.get(f"{url}/metrics").text.splitlines()
        if line.startswith("vllm:request_success_total{") and not line.endswith(" 0.0")
    }
    assert engines == {"0", "1"}, "both replicas served requests"
