"""Tiny random-weight checkpoints of every supported architecture (no model hub here).

Each is a few layers of the family's own transformers config, saved with
`save_pretrained` beside the default model's tokenizer. Weights are drawn with a large
std so greedy argmaxes do not flip on rounding; fp32 throughout. The draw is seeded, so
a checkpoint made on a clean clone equals the one stock vLLM's tokens were recorded on
(`stock_oracles.py`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

NUM_LAYERS = 6
SEED = 0
VOCAB = 49152  # the default model's tokenizer
# vLLM's CPU attention takes head_dim 32 and up (128 / 4 heads here).
BLOCK = (1, 5)
# Gemma's windows are short so the tests' long prompts cross them.
SLIDING_WINDOW = 24
COMMON: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "initializer_range": 0.3,
    "tie_word_embeddings": False,
}
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("llama", {}),
    "MistralForCausalLM": ("mistral", {"sliding_window": None}),
    "Qwen2ForCausalLM": ("qwen2", {}),  # QKV bias
    "Qwen3ForCausalLM": ("qwen3", {"head_dim": 32}),  # q/k norms
    "Phi3ForCausalLM": ("phi3", {"pad_token_id": 0}),  # fused qkv and gate/up
    "Gemma2ForCausalLM": (  # sandwich norms, (1 + w) norms, softcaps, sliding/global
        "gemma2",
        {"head_dim": 32, "sliding_window": SLIDING_WINDOW, "tie_word_embeddings": True},
    ),
    "Gemma3ForCausalLM": (  # + q/k norms, local/global rope; alternating layer types
        "gemma3_text",
        {
            "head_dim": 32,
            "sliding_window": SLIDING_WINDOW,
            "layer_types": ["sliding_attention", "full_attention"] * (NUM_LAYERS // 2),
            "tie_word_embeddings": True,
        },
    ),
}


def recipe(architecture: str) -> dict[str, Any]:
    """Everything `make_tiny_checkpoint` builds `architecture` from (oracles record it)."""
    model_type, extra = FAMILIES[architecture]
    config = {"vocab_size": VOCAB, "architectures": [architecture], **COMMON, **extra}
    return {"model_type": model_type, "config": config, "seed": SEED, "dtype": "float32"}


def make_tiny_checkpoint(architecture: str, root: Path, tokenizer_dir: str) -> str:
    """Create (once) and return the directory of a tiny `architecture` checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = root / architecture
    if (target / "config.json").is_file():
        return str(target)
    made = recipe(architecture)
    tokenizer_files = [p for p in Path(tokenizer_dir).iterdir() if "token" in p.name]
    config = AutoConfig.for_model(made["model_type"], **made["config"])
    torch.manual_seed(made["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target)
    for path in tokenizer_files:
        shutil.copy(path, target / path.name)
    return str(target)
