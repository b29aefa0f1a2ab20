"""The looped model at pipeline_parallel_size=2, two real stages on vLLM's CPU backend.

A tiny 6-layer Llama splits 3/3 (stages 0:3 and 3:6), one core per stage. The block
inside stage 0 and inside stage 1: that stage loops it and holds its KV planes, the
other runs vLLM's forward; every output equals the unrolled oracle (which the
single-process engine equals, test_architectures), solo at each depth and in one
concurrent mixed-depth batch. A block across the boundary is refused at start-up.

The engines run compiled (vLLM's default): vLLM's CPU runner allocates the buffers a
later stage receives into only in its warm-up dummy run, which `enforce_eager` skips.
"""

from __future__ import annotations

import pytest
from conftest import one_core_per_rank, start_llm, stop_llm
from test_architectures import LONG_PROMPT, PROMPTS, greedy
from tiny_models import NUM_LAYERS

pytestmark = pytest.mark.slow

MAX_LOOPS = 3


@pytest.fixture(
    scope="module", params=[(1, 3), (3, 5)], ids=["block-in-stage-0", "block-in-stage-1"]
)
def pp2(request, tiny_checkpoint):
    from loopserve.server.loop_plan import LoopPlan
    from loopserve.server.reference import UnrolledReference

    path = tiny_checkpoint("LlamaForCausalLM")
    with one_core_per_rank():
        llm = start_llm(
            path,
            max_model_len=512,
            loop_block=request.param,
            max_loops=MAX_LOOPS,
            pipeline_parallel_size=2,
        )
    yield llm, UnrolledReference(path, LoopPlan.for_model(NUM_LAYERS, request.param, MAX_LOOPS))
    stop_llm(llm)


def _pipeline_stage(worker) -> tuple[int, int, bool]:
    """(PP rank, first layer, whether this stage holds the looped block), in the worker."""
    from vllm.distributed import get_pp_group

    model = worker.model_runner.get_model()
    return get_pp_group().rank_in_group, model.model.start_layer, model.holds_block


def test_two_stages_and_one_holds_the_block(pp2):
    """Breakage caught: a 'PP' run that is one process, or both stages looping."""
    llm, reference = pp2
    stages = sorted(llm.collective_rpc(_pipeline_stage))
    assert [(rank, first) for rank, first, _ in stages] == [(0, 0), (1, 3)]
    holder = 0 if reference.plan.end <= 3 else 1
    assert [holds for *_, holds in stages] == [rank == holder for rank in (0, 1)]


@pytest.mark.parametrize("loops", range(1, MAX_LOOPS + 1))
def test_each_depth_equals_oracle(pp2, loops):
    llm, reference = pp2
    [output] = llm.generate([LONG_PROMPT], greedy(loops), use_tqdm=False)
    got = list(output.outputs[0].token_ids)
    assert got == reference.greedy_choices(list(output.prompt_token_ids), loops, got)


def test_mixed_depth_batch_equals_oracle(pp2):
    llm, reference = pp2
    prompts = [*PROMPTS, LONG_PROMPT]
    loops = [1, 3, 2, 3, 2]
    outputs = llm.generate(prompts, [greedy(k) for k in loops], use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outputs]
    assert got[1] != reference.greedy_choices(list(outputs[1].prompt_token_ids), 1, got[1])
    for k, output, tokens in zip(loops, outputs, got, strict=True):
        assert tokens == reference.greedy_choices(list(output.prompt_token_ids), k, tokens), k
