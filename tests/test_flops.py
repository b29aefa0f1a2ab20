"""The one FLOPs model against numbers worked by hand and torch's FLOP counter.

The counter runs on meta tensors (benchmarks/flops_check.py), so every test here is fast.
"""

from __future__ import annotations

import pytest
from tiny_models import BLOCK, COMMON, FAMILIES, NUM_LAYERS

from loopserve.benchmarks.flops_check import checkpoint_config, counted_flops
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
# SmolLM-360M by hand (head_dim 64, kv width 5 * 64 = 320, block = layers 14..17):
#   N_layer   = 960 * (960 + 2 * 320) + 960 * 960 + 3 * 960 * 2560 = 9_830_400
#   N_lm_head = 960 * 49152 = 47_185_920
#   fixed(k=1) = 2 * (47_185_920 + 32 * 9_830_400) = 723_517_440
#   fixed(k=2) = 2 * (47_185_920 + 36 * 9_830_400) = 802_160_640
#   per key and executed layer = 4 * 15 * 64 = 3840
FIXED_K1, FIXED_K2, PER_KEY = 723_517_440, 802_160_640, 3840


def smollm_360m(**overrides) -> FlopsModel:
    config = {**SMOLLM_360M, **overrides}
    return FlopsModel(ModelShape.from_hf_config(config), LoopPlan.for_model(32))


@pytest.mark.parametrize(
    ("config", "gflops", "extra_mflops"),
    [(SMOLLM_1_7B, 3.42, 537), (SMOLLM_360M, 0.72, 78.7)],
)
def test_worked_numbers_at_short_context(config, gflops, extra_mflops):
    flops = FlopsModel(
        ModelShape.from_hf_config(config), LoopPlan.for_model(config["num_hidden_layers"])
    )
    assert flops.per_token(1, 1) / 1e9 == pytest.approx(gflops, rel=0.01)
    assert (flops.per_token(2, 1) - flops.per_token(1, 1)) / 1e6 == pytest.approx(
        extra_mflops, rel=0.01
    )


def test_attention_grows_with_the_context_by_hand():
    # The token at position 1023 attends to 1024 keys in each of the 32 layers.
    assert smollm_360m().per_token(1, 1024) == FIXED_K1 + 32 * PER_KEY * 1024 == 849_346_560


def test_a_request_by_hand():
    # loops=2 executes 36 layers. Prompt: positions 0..9 attend to 1 + ... + 10 = 55 keys;
    # completion: positions 10..13 attend to 11 + 12 + 13 + 14 = 50 keys.
    assert smollm_360m().request(2, 10, 4) == (
        10 * FIXED_K2 + 36 * PER_KEY * 55,
        4 * FIXED_K2 + 36 * PER_KEY * 50,
    )


def test_a_sliding_window_caps_the_keys_by_hand():
    # Mistral-style: every layer slides with a 512-key window.
    flops = smollm_360m(sliding_window=512)
    assert flops.per_token(1, 1024) == FIXED_K1 + 32 * PER_KEY * 512
    # Positions 510..513 attend to 511, 512, 512 and 512 keys.
    assert flops.span(1, 510, 514) == 4 * FIXED_K1 + 32 * PER_KEY * 2047


def check_against_counter(config, plan: LoopPlan, loops: int, tokens: int) -> None:
    flops = FlopsModel(ModelShape.from_hf_config(config.to_dict()), plan)
    assert flops.span(loops, 0, tokens) == counted_flops(config, plan, loops, tokens)


@pytest.mark.parametrize("loops", [1, 4])
def test_matches_torch_flop_counter_on_the_default_model(model_path, loops):
    """1041 tokens: attention is ~12% of the FLOPs there, so a wrong attention term fails."""
    check_against_counter(checkpoint_config(model_path), LoopPlan.for_model(30), loops, 1041)


WINDOWED_MISTRAL = ("mistral", {"sliding_window": 24})


@pytest.mark.parametrize(
    "family", [*FAMILIES.values(), WINDOWED_MISTRAL], ids=[*FAMILIES, "MistralWindowed"]
)
def test_matches_torch_flop_counter_per_family(family):
    """100 tokens cross the 24-key windows of Gemma's sliding layers and windowed Mistral."""
    from transformers import AutoConfig

    model_type, extra = family
    config = AutoConfig.for_model(model_type, vocab_size=49152, **{**COMMON, **extra})
    for loops in (1, 3):
        check_against_counter(config, LoopPlan.for_model(NUM_LAYERS, BLOCK, 3), loops, 100)
