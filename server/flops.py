"""The one FLOPs model: forward FLOPs of executed layers, used by server usage and bench.

Per token at context length T (keys attended = position + 1), matmul = 2 FLOPs per MAC:

    F(k, T) = 2 * (N_lm_head + sum_executed N_layer) + sum_executed 4 * T * n_heads * head_dim

N_layer counts the layer's weight matrices (q, k, v, o, gate, up, down; norms are
negligible); the embedding lookup is free. The lm_head counts for every token, as in a
full forward of the reference model (vLLM computes logits only where it samples, so
this slightly over-counts prefill; the same convention holds for every loop count).
Torch-free: the HTTP layer and the harness import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loopserve.server.loop_plan import LoopPlan


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
        )

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's matmuls."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (q + 2 * kv) + q * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return attention + mlp

    @property
    def lm_head_params(self) -> int:
        return self.hidden_size * self.vocab_size


@dataclass(frozen=True)
class FlopsModel:
    shape: ModelShape
    plan: LoopPlan

    def _terms(self, loops: int) -> tuple[int, int]:
        """(FLOPs independent of context, FLOPs per attended key) for one token."""
        depth = self.plan.executed_depth(self.plan.check_loops(loops))
        fixed = 2 * (self.shape.lm_head_params + depth * self.shape.layer_params)
        per_key = depth * 4 * self.shape.num_heads * self.shape.head_dim
        return fixed, per_key

    def per_token(self, loops: int, context: int) -> int:
        """F(k, T): one token that attends to `context` keys."""
        fixed, per_key = self._terms(loops)
        return fixed + per_key * context

    def span(self, loops: int, start: int, stop: int) -> int:
        """Sum of F over the tokens at positions [start, stop) of one sequence."""
        if stop <= start:
            return 0
        fixed, per_key = self._terms(loops)
        keys = stop * (stop + 1) // 2 - start * (start + 1) // 2  # sum of (position + 1)
        return fixed * (stop - start) + per_key * keys

    def request(self, loops: int, prompt_tokens: int, completion_tokens: int) -> tuple[int, int]:
        """(prompt FLOPs, completion FLOPs) of one request."""
        total = prompt_tokens + completion_tokens
        return (
            self.span(loops, 0, prompt_tokens),
            self.span(loops, prompt_tokens, total),
        )
