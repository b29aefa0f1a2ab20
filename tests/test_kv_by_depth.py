"""KV by depth: a request holds KV for the passes it runs, and vLLM's scheduler admits
and preempts by that footprint, every output still exact.

A tiny Llama (6 layers, block 1:5, K = 4; eager, fp32) on a pool of 24 blocks of 128
tokens. vLLM groups its layers in fours: the model's own 6 layers in 2 KV-cache groups
(2 padding layers), each pass p >= 2 its 4 planes in 1 group of its own. A token of a
k-deep request so takes a slot in 2 + (k - 1) groups.
"""

from __future__ import annotations

import pytest
from conftest import start_llm, stop_llm

from loopserve.benchmarks.kv_capacity import gauge, usage_while_running

POOL_BLOCKS = 24
BASE_GROUPS = 2


def groups_held(loops: int) -> int:
    return BASE_GROUPS + loops - 1


@pytest.fixture(scope="module")
def small_pool(tiny_checkpoint):
    llm = start_llm(
        tiny_checkpoint("LlamaForCausalLM"),
        loop_block=(1, 5),
        max_loops=4,
        max_model_len=512,
        enforce_eager=True,
        vllm_options={"num_gpu_blocks_override": POOL_BLOCKS, "disable_log_stats": False},
    )
    yield llm
    stop_llm(llm)


def _params(loops: int, max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args={"loops": loops}
    )


def _blocks_held_while_running(llm, prompt_ids: list[int], loops: int) -> float:
    """Pool blocks in use while one request of `loops` runs alone (vLLM's usage is of
    the pool less its null block)."""
    return usage_while_running(llm, prompt_ids, _params(loops, 64)) * (POOL_BLOCKS - 1)


def test_a_request_holds_kv_for_its_own_depth_only(small_pool):
    """Breakage caught: every request holding blocks for all K passes (the planes in
    the model's own groups, or managers that allocate whatever the depth): a k=1
    request would hold 10 blocks (2 in each of 5 groups), not 4."""
    prompt = [(7 * i) % 1000 + 10 for i in range(200)]  # 2 blocks of 128 per group
    for loops in (1, 2, 4):
        held = _blocks_held_while_running(small_pool, [loops, *prompt], loops)
        assert held == pytest.approx(2 * groups_held(loops)), loops


def test_preempted_mixed_depths_equal_their_solo_runs(small_pool):
    """Decodes of mixed depths outgrow the pool together (about 60 blocks for 24), so
    vLLM preempts and recomputes; each output still equals the request run alone.

    Breakage caught: a manager that under-counts a deep request's blocks (admission
    past the pool: allocation fails and the engine dies), or one that hands a stopped
    row a block another request owns (outputs differ)."""
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "counting",
        "sheep",
    ]
    prompts = [" ".join(words[i:] + words[:i]) * 8 for i in range(6)]
    loops = [4, 1, 2, 4, 1, 3]
    preempted_before = gauge(small_pool, "vllm:num_preemptions")
    together = small_pool.generate(prompts, [_params(k, 250) for k in loops], use_tqdm=False)
    assert gauge(small_pool, "vllm:num_preemptions") > preempted_before
    for prompt, k, output in zip(prompts, loops, together, strict=True):
        [solo] = small_pool.generate([prompt], _params(k, 250), use_tqdm=False)
        assert list(output.outputs[0].token_ids) == list(solo.outputs[0].token_ids), k


def test_a_layout_that_mixes_passes_is_refused():
    """Breakage caught: vLLM (another release, another option) putting planes of two
    passes, or planes and the model's own layers, in one KV-cache group."""
    from types import SimpleNamespace

    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from loopserve.server.pass_kv import check_groups

    base = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype="float32")
    planes = {"plane.2": 2, "plane.3": 3}
    mixed = [SimpleNamespace(kv_cache_spec=base, layer_names=["layer.0", "plane.2"])]
    with pytest.raises(RuntimeError, match="hybrid KV-cache manager"):
        check_groups(mixed, planes)
