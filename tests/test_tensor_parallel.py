"""The looped model at tensor_parallel_size=2, run for real on vLLM's CPU backend.

One core per rank (`conftest.one_core_per_rank`). Tiny checkpoints, since the
default model's 9 attention heads do not split in two: Qwen2 (QKV bias, fused add+norm
hand-over) and Gemma-2 (sandwich norms, PyTorch hand-over, sliding windows). Every rank
derives the same schedule from the same requests; the outputs must equal the unrolled
oracle, as the TP=1 engine's do (test_architectures).
"""

from __future__ import annotations

import os

import pytest
from conftest import one_core_per_rank, start_llm, stop_llm
from test_architectures import LONG_PROMPT, PROMPTS, greedy
from tiny_models import BLOCK, NUM_LAYERS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["Qwen2ForCausalLM", "Gemma2ForCausalLM"])
def tp2(request, tiny_checkpoint):
    from loopserve.server.loop_plan import LoopPlan
    from loopserve.server.reference import UnrolledReference

    path = tiny_checkpoint(request.param)
    with one_core_per_rank():
        llm = start_llm(
            path,
            max_model_len=512,
            loop_block=BLOCK,
            max_loops=3,
            enforce_eager=True,
            tensor_parallel_size=2,
        )
    yield llm, UnrolledReference(path, LoopPlan.for_model(NUM_LAYERS, BLOCK, 3))
    stop_llm(llm)


def _tensor_parallel_rank(worker) -> tuple[int, int, int]:
    """(TP rank, TP world size, process id) as the worker itself sees them."""
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(), os.getpid()


def test_tp2_is_really_two_ranks(tp2):
    llm, _ = tp2
    ranks = llm.collective_rpc(_tensor_parallel_rank)
    assert sorted((rank, size) for rank, size, _ in ranks) == [(0, 2), (1, 2)]
    assert len({pid for *_, pid in ranks}) == 2  # two worker processes


def test_tp2_mixed_batch_equals_oracle(tp2):
    llm, reference = tp2
    prompts = [*PROMPTS, LONG_PROMPT]
    loops = [1, 2, 3, 2, 3]
    outputs = llm.generate(prompts, [greedy(k) for k in loops], use_tqdm=False)
    for k, output in zip(loops, outputs, strict=True):
        got = list(output.outputs[0].token_ids)
        assert got == reference.greedy_choices(list(output.prompt_token_ids), k, got), (
            k,
            output.prompt,
        )
