"""The one FLOPs model against torch's FLOP counter on the unrolled reference model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("loops", [1, 2, 4])
def test_matches_torch_flop_counter_on_reference(reference, model_path, loops):
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads((Path(model_path) / "config.json").read_text())
    flops = FlopsModel(ModelShape.from_hf_config(config), reference.plan)
    tokens = list(range(100, 164))
    n = len(tokens)
    # Eager attention: its matmuls are visible to the counter (the CPU SDPA kernel is not).
    reference.model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            reference.logits(tokens, loops)
    finally:
        reference.model.set_attn_implementation("sdpa")
    # Eager attention computes the full n x n score square and masks it; our model counts
    # only the keys each token attends to. Same matmuls otherwise.
    model = flops.span(loops, 0, n)
    masked_keys = n * n - n * (n + 1) // 2
    attention_width = config["num_attention_heads"] * (config.get("head_dim") or 64)
    square = model + flops.plan.executed_depth(loops) * 4 * attention_width * masked_keys
    assert counter.get_total_flops() == pytest.approx(square, rel=0.02)
