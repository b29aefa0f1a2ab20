"""Every supported architecture, looped through vLLM's own model class, in fp32.

For each family (a tiny random checkpoint, `tiny_models.py`): k=1 == stock vLLM on the
same checkpoint (its tokens recorded in tests/oracles/ by `make oracles`); k=2, 3 == the
unrolled transformers model (the family's own HF layers listed out in execution order, no
KV cache); a mixed-k batch == each solo run; a long prompt (longer than Gemma's sliding
window) through chunked prefill == the oracle.

Qwen3 (fused hand-over, q/k norms) and Gemma-3 (PyTorch hand-over, alternating sliding
and full attention) run at vLLM's default compilation, stock and looped alike, so their
looped steps run compiled segments (test_engine.py covers Llama that way); the other
families run with `enforce_eager` (looped engine and recorded stock run alike), which
keeps this module's time down: compiling costs about 3 minutes per family here.
"""

from __future__ import annotations

import pytest
from conftest import compiled_segments, start_llm, stop_llm
from stock_oracles import StockRun, stock_tokens
from tiny_models import BLOCK, FAMILIES, NUM_LAYERS, SLIDING_WINDOW

pytestmark = pytest.mark.slow

MAX_LOOPS = 3
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Question: What is 12 + 7?\nAnswer:",
]
LONG_PROMPT = " ".join(f"item {i} is a {w}" for i, w in enumerate(["cat", "dog", "cow"] * 12))
MAX_TOKENS = 8
COMPILED = {"Qwen3ForCausalLM", "Gemma3ForCausalLM"}


def greedy(loops: int, max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args={"loops": loops})


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def stock_run(architecture: str) -> StockRun:
    """Stock vLLM on the family's checkpoint, compiled as its looped engine is."""
    return StockRun(architecture, tuple(PROMPTS), MAX_TOKENS, 512, architecture not in COMPILED)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_checkpoint):
    """(architecture, stock vLLM's recorded k=1 tokens, looped engine, oracle)."""
    from loopserve.server.loop_plan import LoopPlan
    from loopserve.server.reference import UnrolledReference

    architecture = request.param
    path = tiny_checkpoint(architecture)
    eager = architecture not in COMPILED
    stock_k1 = stock_tokens(stock_run(architecture), path)
    looped = start_llm(
        path,
        max_model_len=512,
        loop_block=BLOCK,
        max_loops=MAX_LOOPS,
        enforce_eager=eager,
        max_num_batched_tokens=32,  # the long prompt prefills in chunks
    )
    plan = LoopPlan.for_model(NUM_LAYERS, BLOCK, MAX_LOOPS)
    yield architecture, stock_k1, looped, UnrolledReference(path, plan)
    stop_llm(looped)


def test_k1_equals_stock_vllm(family):
    _, stock_k1, looped, _ = family
    assert token_ids(looped.generate(PROMPTS, greedy(1), use_tqdm=False)) == stock_k1


@pytest.mark.parametrize("loops", [2, 3])
def test_loops_equal_unrolled_reference(family, loops):
    architecture, _, looped, reference = family
    for output in looped.generate(PROMPTS, greedy(loops), use_tqdm=False):
        got = list(output.outputs[0].token_ids)
        assert got == reference.greedy_choices(list(output.prompt_token_ids), loops, got), (
            architecture,
            loops,
            output.prompt,
        )


def test_looping_changes_the_output(family):
    """Guards the oracle test against a model that ignores `loops`."""
    _, stock_k1, looped, _ = family
    assert token_ids(looped.generate(PROMPTS, greedy(3), use_tqdm=False)) != stock_k1


def test_mixed_batch_equals_solo_runs(family):
    _, _, looped, _ = family
    loops = [1, 2, 3, 2]
    mixed = looped.generate(
        [{"prompt": p, "cache_salt": "mixed"} for p in PROMPTS],
        [greedy(k) for k in loops],
        use_tqdm=False,
    )
    for prompt, k, output in zip(PROMPTS, loops, mixed, strict=True):
        solo = looped.generate(
            [{"prompt": prompt, "cache_salt": "solo"}], greedy(k), use_tqdm=False
        )
        assert token_ids(solo) == [list(output.outputs[0].token_ids)], (prompt, k)


def test_long_prompt_in_chunks_equals_reference(family):
    """Longer than the sliding window, prefilled 32 tokens a step, at k=1 and k=3."""
    architecture, _, looped, reference = family
    outputs = looped.generate([LONG_PROMPT] * 2, [greedy(1), greedy(3)], use_tqdm=False)
    assert len(outputs[0].prompt_token_ids) > 3 * SLIDING_WINDOW
    for k, output in zip((1, 3), outputs, strict=True):
        got = list(output.outputs[0].token_ids)
        assert got == reference.greedy_choices(list(output.prompt_token_ids), k, got), (
            architecture,
            k,
        )


def test_looped_steps_run_compiled_segments_when_compiling(family):
    """Compiled families compile their segments once, at start-up; eager ones never."""
    architecture, _, looped, _ = family
    looped.generate(PROMPTS[:1], greedy(2, max_tokens=2), use_tqdm=False)
    [segments] = looped.apply_model(compiled_segments)
    # prelude, block (every pass, one graph), coda
    expected = ["LoopPrelude", "LoopBlock", "LoopCoda"]
    assert segments == (expected if architecture in COMPILED else [])
