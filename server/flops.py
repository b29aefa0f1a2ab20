"""The one FLOPs model: forward FLOPs of executed layers, used by server usage and bench.

Per token at position t, matmul = 2 FLOPs per MAC, summed over the executed layers:

    F(k, t) = 2 * (N_lm_head + sum_executed N_layer) + sum_executed 4 * T_l * n_heads * head_dim

with T_l the keys layer l attends to: t + 1, or min(t + 1, W) for a layer with a sliding
window W (Mistral's, or the sliding layers of Gemma-2/3 and Qwen's `layer_types`).
N_layer counts the layer's weight matrices (q, k, v at their GQA widths, o, gate, up,
down); biases, norms, softcaps and the embedding lookup are not matmuls and are not
counted, and a tied lm_head costs the same matmul as an untied one. The lm_head counts
for every token, as in a full forward of the reference model (vLLM computes logits only
where it samples, so this slightly over-counts prefill; the same convention holds for
every loop count). Torch-free: the HTTP layer and the harness import it.
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
    # Per layer of the checkpoint: its sliding window, or None for full attention.
    layer_windows: tuple[int | None, ...] = ()

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
            layer_windows=_layer_windows(config),
        )

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

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


def _layer_windows(config: dict[str, Any]) -> tuple[int | None, ...]:
    """Sliding window per layer, read the way transformers' configs declare it."""
    num_layers = config.get("num_hidden_layers", 0)
    window = config.get("sliding_window")
    if not window or config.get("use_sliding_window") is False:
        return (None,) * num_layers
    layer_types = config.get("layer_types")
    if layer_types is None:
        return (window,) * num_layers  # Mistral-style: every layer slides
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def _keys(n: int, window: int | None) -> int:
    """Keys attended by the tokens at positions [0, n) of one layer, summed."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


@dataclass(frozen=True)
class FlopsModel:
    shape: ModelShape
    plan: LoopPlan

    def _fixed(self, loops: int) -> int:
        """FLOPs of one token that do not depend on its context."""
        depth = self.plan.executed_depth(self.plan.check_loops(loops))
        return 2 * (self.shape.lm_head_params + depth * self.shape.layer_params)

    @property
    def _per_key(self) -> int:
        """FLOPs of one layer per attended key: q.k and p.v over all heads."""
        return 4 * self.shape.num_heads * self.shape.head_dim

    def attended_keys(self, loops: int, start: int, stop: int) -> int:
        """Keys attended by the tokens at positions [start, stop), over executed layers."""
        return sum(
            _keys(stop, self.shape.window(layer)) - _keys(start, self.shape.window(layer))
            for layer in self.plan.executed_layers(loops)
        )

    def per_token(self, loops: int, context: int) -> int:
        """F(k, t): the token at position `context - 1` (it attends to `context` keys)."""
        return self.span(loops, context - 1, context)

    def span(self, loops: int, start: int, stop: int) -> int:
        """Sum of F over the tokens at positions [start, stop) of one sequence."""
        if stop <= start:
            return 0
        return self._fixed(loops) * (stop - start) + self._per_key * self.attended_keys(
            loops, start, stop
        )

    def request(self, loops: int, prompt_tokens: int, completion_tokens: int) -> tuple[int, int]:
        """(prompt FLOPs, completion FLOPs) of one request."""
        total = prompt_tokens + completion_tokens
        return (
            self.span(loops, 0, prompt_tokens),
            self.span(loops, prompt_tokens, total),
        )
