"""The one FLOPs model against torch's FLOP counter on the unrolled reference model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import BLOCK, FAMILIES, NUM_LAYERS

from loopserve.server.flops import FlopsModel, ModelShape
from loopserve.server.loop_plan import LoopPlan

# Public SmolLM configs (design digest, section 4).
SMOLLM_1_7B = {
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 8192,
    "vocab_size": 49152,
    "num_hidden_layers": 24,
}
SMOLLM_360M = {
    "hidden_size": 960,
    "num_attention_heads": 15,
    "num_key_value_heads": 5,
    "intermediate_size": 2560,
    "vocab_size": 49152,
    "num_hidden_layers": 32,
}


@pytest.mark.parametrize(
    ("config", "gflops", "extra_mflops"),
    [(SMOLLM_1_7B, 3.42, 537), (SMOLLM_360M, 0.72, 78.7)],
)
def test_worked_numbers(config, gflops, extra_mflops):
    flops = FlopsModel(
        ModelShape.from_hf_config(config), LoopPlan.for_model(config["num_hidden_layers"])
    )
    assert flops.per_token(1, 1) / 1e9 == pytest.approx(gflops, rel=0.01)
    assert (flops.per_token(2, 1) - flops.per_token(1, 1)) / 1e6 == pytest.approx(
        extra_mflops, rel=0.01
    )


def test_span_is_the_sum_of_per_token():
    flops = FlopsModel(ModelShape.from_hf_config(SMOLLM_360M), LoopPlan.for_model(32))
    for loops in (1, 3):
        assert flops.span(loops, 5, 17) == sum(flops.per_token(loops, t + 1) for t in range(5, 17))
    assert flops.request(2, 10, 4) == (flops.span(2, 0, 10), flops.span(2, 10, 14))


def counted_by_torch(reference, tokens: list[int], loops: int) -> int:
    """FLOPs torch's counter sees in one forward of the unrolled reference."""
    from torch.utils.flop_counter import FlopCounterMode

    # Eager attention: its matmuls are visible to the counter (the CPU SDPA kernel is not).
    reference.model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            reference.logits(tokens, loops)
    finally:
        reference.model.set_attn_implementation("sdpa")
    return counter.get_total_flops()


def masked_keys(reference, n: int, loops: int) -> int:
    """Score entries eager attention computes and then masks, over the executed layers.

    Counted by brute force from the HF layers' own windows (independent of the FLOPs
    model): causal masking, plus the keys that fall out of a sliding layer's window.
    """
    total = 0
    for layer in reference.plan.executed_layers(loops):
        window = getattr(reference.model.model.layers[layer].self_attn, "sliding_window", None)
        kept = sum(min(t + 1, window) if window else t + 1 for t in range(n))
        total += n * n - kept
    return total


def check_against_counter(reference, config: dict, loops: int, n: int = 1024) -> None:
    flops = FlopsModel(ModelShape.from_hf_config(config), reference.plan)
    counted = counted_by_torch(reference, [100 + i % 1000 for i in range(n)], loops)
    # Eager attention computes the full n x n score square per layer and masks it; our
    # model counts only the keys each token attends to. Same matmuls otherwise.
    per_key = (
        4
        * config["num_attention_heads"]
        * (config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    )
    square = flops.span(loops, 0, n) + per_key * masked_keys(reference, n, loops)
    assert counted == pytest.approx(square, rel=0.02)
    # At this length the attention term is well over the 2% tolerance: dropping it fails.
    attention = per_key * flops.attended_keys(loops, 0, n)
    assert attention > 0.04 * square


@pytest.mark.parametrize("loops", [1, 4])
def test_matches_torch_flop_counter_on_reference(reference, model_path, loops):
    config = json.loads((Path(model_path) / "config.json").read_text())
    check_against_counter(reference, config, loops)


@pytest.mark.parametrize("architecture", list(FAMILIES))
def test_matches_torch_flop_counter_per_family(tiny_checkpoint, architecture):
    from loopserve.server.loop_plan import LoopPlan
    from loopserve.server.reference import UnrolledReference

    path = tiny_checkpoint(architecture)
    config = json.loads((Path(path) / "config.json").read_text())
    reference = UnrolledReference(path, LoopPlan.for_model(NUM_LAYERS, BLOCK, 3))
    for loops in (1, 3):
        check_against_counter(reference, config, loops)
