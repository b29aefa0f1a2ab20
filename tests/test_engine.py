"""The looped model inside a real vLLM engine, on the real default model, in fp32.

Exactness is asserted as greedy token equality: against stock vLLM's recorded tokens for
k=1 (tests/oracles/, `make oracles`), against the unrolled transformers oracle for k>1,
against solo runs for mixed batches.
"""

from __future__ import annotations

import os

import pytest
from conftest import compiled_segments, start_llm, stop_llm
from stock_oracles import StockRun, stock_tokens

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Question: What is 12 + 7?\nAnswer:",
    "The three primary colors are",
    "import numpy as np\n\nx = np.",
]
MAX_TOKENS = 16
# Long enough to fill two of vLLM's CPU KV blocks (128 tokens), so the prefix cache has
# something to reuse, and to need several 64-token prefill chunks.
STORY = (
    "Here is a short story about a lighthouse keeper named Ada who lived alone on a rocky "
    "island. Every night she climbed the spiral stairs, lit the great lamp and watched the "
    "ships pass safely in the dark. One stormy evening a small fishing boat lost its way "
    "and Ada had to decide whether to leave her post to help. The wind howled, the waves "
    "crashed against the rocks, and the beam of the lamp swept across the black water again "
    "and again. She thought of her father, who had kept the light before her, and of the "
    "promise she had made to him. Then she saw a flare rise from the boat."
)
LONG_PROMPT = f"{STORY}\n\nThe next winter the same thing happened.\n\n{STORY} This time she"
# Stock vLLM at its defaults (compiled) on the default model: test_k1_equals_stock_vllm.
STOCK = StockRun("SmolLM2-135M-Instruct", tuple(PROMPTS), MAX_TOKENS, 1024, enforce_eager=False)


def greedy(loops: int, max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args={"loops": loops})


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def stock_k1(model_path):
    """Stock vLLM's tokens (stock Llama, no plugin model, compiled), as recorded."""
    return stock_tokens(STOCK, model_path)


@pytest.fixture(scope="module")
def looped(model_path):
    """vLLM's defaults (compiled), prefix caching on, 64-token steps (chunked prefill)."""
    llm = start_llm(model_path, max_num_batched_tokens=64)
    [llm.segments_at_start] = llm.apply_model(compiled_segments)  # before any request
    yield llm
    stop_llm(llm)


def test_k1_equals_stock_vllm(looped, stock_k1):
    assert token_ids(looped.generate(PROMPTS, greedy(1), use_tqdm=False)) == stock_k1


@pytest.mark.parametrize("loops", [2, 3, 4])
def test_loops_equal_unrolled_reference(looped, reference, loops):
    outputs = looped.generate(PROMPTS[:3], greedy(loops), use_tqdm=False)
    for output in outputs:
        got = list(output.outputs[0].token_ids)
        want = reference.greedy_choices(list(output.prompt_token_ids), loops, got)
        assert got == want, (loops, output.prompt)


def test_looping_changes_the_output(looped):
    """Guards the oracle test against a model that ignores `loops` everywhere."""
    by_loops = [token_ids(looped.generate(PROMPTS, greedy(k), use_tqdm=False)) for k in (1, 3)]
    assert by_loops[0] != by_loops[1]


def test_mixed_batch_equals_solo_runs(looped):
    prompts = [p for p in PROMPTS for _ in range(2)]
    loops = [(i % 4) + 1 for i in range(len(prompts))]
    mixed = looped.generate(
        [{"prompt": p, "cache_salt": "mixed"} for p in prompts],
        [greedy(k) for k in loops],
        use_tqdm=False,
    )
    for prompt, k, output in zip(prompts, loops, mixed, strict=True):
        solo = looped.generate(
            [{"prompt": prompt, "cache_salt": "solo"}], greedy(k), use_tqdm=False
        )
        assert token_ids(solo) == [list(output.outputs[0].token_ids)], (prompt, k)


def test_chunked_prefill_equals_reference(looped, reference):
    """LONG_PROMPT needs several 64-token steps; the oracle sees it whole."""
    output = looped.generate([LONG_PROMPT], greedy(3), use_tqdm=False)[0]
    assert len(output.prompt_token_ids) > 2 * 128
    got = list(output.outputs[0].token_ids)
    assert got == reference.greedy_choices(list(output.prompt_token_ids), 3, got)


def run_prefix_order(llm, first: int, second: int, salt: str):
    """(LONG_PROMPT, first) then (LONG_PROMPT, second); returns the second output.

    Each order gets its own user cache salt so it cannot see the other order's entries.
    """
    prompt = {"prompt": LONG_PROMPT, "cache_salt": salt}
    llm.generate([prompt], greedy(first), use_tqdm=False)
    return llm.generate([prompt], greedy(second), use_tqdm=False)[0]


def test_prefix_cache_is_keyed_by_loops(looped, reference):
    k2_after_k3 = run_prefix_order(looped, 3, 2, "order-a")
    k3_after_k2 = run_prefix_order(looped, 2, 3, "order-b")
    k3_again = looped.generate(
        [{"prompt": LONG_PROMPT, "cache_salt": "order-b"}], greedy(3), use_tqdm=False
    )[0]
    # A different k must not reuse the prefix; the same k must (else this test proves nothing).
    assert k2_after_k3.num_cached_tokens == 0
    assert k3_after_k2.num_cached_tokens == 0
    assert k3_again.num_cached_tokens > 0
    for k, output in ((2, k2_after_k3), (3, k3_after_k2), (3, k3_again)):
        got = list(output.outputs[0].token_ids)
        assert got == reference.greedy_choices(list(output.prompt_token_ids), k, got), k


def _count_prelude_calls(model) -> None:
    """Count Python-level calls of the first decoder layer (a compiled graph makes none)."""
    layer = model.model.layers[0]
    layer.loopserve_calls = 0

    def count(module, args):
        module.loopserve_calls += 1

    model.loopserve_hook = layer.register_forward_pre_hook(count)


def _prelude_calls(model) -> int:
    return model.model.layers[0].loopserve_calls


def _remove_count(model) -> None:
    model.loopserve_hook.remove()


SEGMENTS = ["LoopPrelude", "LoopBlock", "LoopCoda"]


def _vllm_graph_compiled(model) -> bool:
    return model.model.compiled


def test_steps_run_compiled(looped):
    """Every step runs the segments compiled at start-up; vLLM's graph never compiles.

    Three segments (prelude, block: every pass, coda) whatever `--max-loops` (4 here),
    compiled by the warm-up before any request, and no Python-level layer call in any
    later step, whatever the batch (one row included). On the CPU (trace-once, no CUDA
    graphs) k=1 steps run the segments too, so vLLM's whole-model graph, the same
    layers again, is never compiled.
    """
    [before] = looped.apply_model(compiled_segments)
    looped.apply_model(_count_prelude_calls)
    try:
        looped.generate(PROMPTS[:2], greedy(1), use_tqdm=False)
        [after_k1] = looped.apply_model(_prelude_calls)
        looped.generate(PROMPTS[:2], [greedy(2), greedy(4)], use_tqdm=False)
        looped.generate(PROMPTS[:1], greedy(3), use_tqdm=False)
        [after_looped] = looped.apply_model(_prelude_calls)
    finally:
        looped.apply_model(_remove_count)
    [after] = looped.apply_model(compiled_segments)
    assert after_k1 == 0
    assert after_looped == 0
    assert looped.segments_at_start == before == after == SEGMENTS
    assert looped.apply_model(_vllm_graph_compiled) == [False]


@pytest.mark.parametrize("bad", [99, 0, "2", 2.5, [3], True])
def test_bad_loops_through_vllm_fail_that_request_alone(looped, bad):
    """extra_args reaching vLLM directly (offline LLM) are checked when vLLM admits them."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError

    with pytest.raises(VLLMClientError, match="'loops' must be"):
        looped.generate(
            ["hello"], SamplingParams(max_tokens=2, extra_args={"loops": bad}), use_tqdm=False
        )
    [output] = looped.generate(["hello"], greedy(2, max_tokens=2), use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 2


def _forward_without_loop_counts(model) -> str:
    import torch

    from loopserve.server.loop_context import MissingLoopCounts

    try:
        model(torch.tensor([1, 2]), torch.tensor([0, 1]))
    except MissingLoopCounts as error:
        return str(error)
    return "no error"


def test_batch_without_loop_counts_raises(looped):
    [message] = looped.apply_model(_forward_without_loop_counts)
    assert "without per-token loop counts" in message


@pytest.fixture(scope="module")
def triton_interpreted(model_path):
    """The engine with the loop step forced through the Triton kernel (interpreted on CPU).

    The variables must be in the environment when vLLM spawns its worker, which imports
    Triton (Triton reads TRITON_INTERPRET at import).
    """
    forced = {"LOOPSERVE_KERNEL": "triton", "TRITON_INTERPRET": "1"}
    saved = {name: os.environ.get(name) for name in forced}
    os.environ.update(forced)
    try:
        llm = start_llm(model_path, enforce_eager=True)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    yield llm
    stop_llm(llm)


def test_triton_loop_step_in_the_engine(triton_interpreted, reference):
    """Short generation (the interpreter is slow): mixed k through the Triton kernel."""
    loops = [2, 3, 1]
    triton_interpreted.apply_model(_count_prelude_calls)
    try:
        outputs = triton_interpreted.generate(
            PROMPTS[:3], [greedy(k, max_tokens=6) for k in loops], use_tqdm=False
        )
        [prelude_calls] = triton_interpreted.apply_model(_prelude_calls)
    finally:
        triton_interpreted.apply_model(_remove_count)
    for k, output in zip(loops, outputs, strict=True):
        got = list(output.outputs[0].token_ids)
        assert got == reference.greedy_choices(list(output.prompt_token_ids), k, got), (
            k,
            output.prompt,
        )
    # --enforce-eager turns the segments' compilation off too: the layers run in Python
    # (which guards the counts in test_steps_run_compiled).
    assert triton_interpreted.apply_model(compiled_segments) == [[]]
    assert prelude_calls > 0


def _block_mlp_calls_per_dummy_run(worker) -> list[int]:
    """Calls of the loop block's first MLP in each of vLLM's dummy runs, at several sizes
    (vLLM pads them to sizes of its own). Runs in the worker of an eager engine, where
    every layer is a Python call: a k=1 forward runs the block once, a looped one k times.
    """
    model = worker.model_runner.get_model()
    mlp = model.model.layers[model.loop_plan.start].mlp
    calls: list[int] = []

    def count(module, args) -> None:
        calls[-1] += 1

    hook = mlp.register_forward_pre_hook(count)
    try:
        for size in (1, 3, 17, 64):
            calls.append(0)
            worker.model_runner._dummy_run(size)
    finally:
        hook.remove()
    return calls


def test_dummy_runs_take_the_k1_path(triton_interpreted):
    """Dummy runs of any (padded) size run, each at k=1 (the block once, no hand-over)."""
    assert triton_interpreted.collective_rpc(_block_mlp_calls_per_dummy_run) == [[1, 1, 1, 1]]
