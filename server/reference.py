"""Unrolled reference: the looped model written out as a plain transformers model.

The oracle for exactness: the executed layers listed out in order (block layers
repeated, weights shared), fp32, no KV cache, so every token recomputes the whole
prefix. Any KV or batching mistake in the served model shows up as a token mismatch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from loopserve.server.loop_plan import LoopPlan


class UnrolledReference:
    def __init__(self, model_path: str, plan: LoopPlan) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.plan = plan
        self._layers = self.model.model.layers

    @contextmanager
    def unrolled(self, loops: int) -> Iterator[nn.Module]:
        """The model with its layer list replaced by the executed order for `loops`."""
        order = self.plan.executed_layers(self.plan.check_loops(loops))
        config = self.model.config
        saved = config.num_hidden_layers, getattr(config, "layer_types", None)
        self.model.model.layers = nn.ModuleList(self._layers[i] for i in order)
        config.num_hidden_layers = len(order)
        if saved[1] is not None:
            config.layer_types = [saved[1][i] for i in order]
        try:
            yield self.model
        finally:
            self.model.model.layers = self._layers
            config.num_hidden_layers = saved[0]
            if saved[1] is not None:
                config.layer_types = saved[1]

    @torch.inference_mode()
    def logits(self, token_ids: list[int], loops: int) -> torch.Tensor:
        """[len(token_ids), vocab] logits of one full forward."""
        with self.unrolled(loops) as model:
            ids = torch.tensor([token_ids])
            return model(input_ids=ids, use_cache=False).logits[0]

    def greedy_choices(
        self, token_ids: list[int], loops: int, continuation: list[int]
    ) -> list[int]:
        """The greedy token after `token_ids` followed by each prefix of `continuation`,
        from one forward over the whole sequence.

        Equal to `continuation` exactly when `continuation` is the greedy continuation
        (each choice is made on the prefix the continuation already holds): a served
        output is checked in one forward rather than one per token.
        """
        if not continuation:
            return []
        logits = self.logits([*token_ids, *continuation[:-1]], loops)
        return logits[len(token_ids) - 1 :].argmax(-1).tolist()

    def greedy(self, token_ids: list[int], loops: int, max_tokens: int) -> list[int]:
        """Greedy continuation, recomputing the whole sequence for every token."""
        ids = list(token_ids)
        for _ in range(max_tokens):
            ids.append(int(self.logits(ids, loops)[-1].argmax()))
        return ids[len(token_ids) :]
