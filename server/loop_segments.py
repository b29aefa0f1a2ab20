"""Compiled segments of a looped step: the prelude, the block (every pass), the coda.

vLLM compiles a model's forward as one traced graph, which fixes the order of its
layers; a looped step's order depends on its batch (how many passes, which rows run
each). loopserve compiles the runs of layers that are the same in every step as
separate modules, the way vLLM's `models/gemma3n.py` compiles its two decoders: each
segment class carries vLLM's `support_torch_compile`, so it compiles once, guard-free,
with the engine's backend and options, is saved to and loaded from vLLM's compile
cache, and runs eagerly under `--enforce-eager`. The pass loop, row gathers and
hand-over run in Python between segments.

Three graphs, whatever `--max-loops`, over the model's own layers once each (as many
layers as vLLM's one graph traces): the layers before the block, the block, whose pass
attention picks the running pass's attention at run time so that every pass runs one
graph, and the coda. Each role is its own class because vLLM keys a cached artifact by
the forward's qualified name and the engine's config, and the roles hold different
layers.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import set_current_vllm_config

# How a decoder layer is called in vLLM: (positions, hidden_states, residual) ->
# (hidden_states, residual). Segments and `LoopedBlock` are called the same way.
LayerCall = Callable[..., tuple[torch.Tensor, torch.Tensor]]

ROLES = ("LoopPrelude", "LoopBlock", "LoopCoda")

# Rows vary per step (and per pass): the token dimension is dynamic in every segment.
DYNAMIC_DIMS = {"positions": -1, "hidden_states": 0, "residual": 0}


class Segment(nn.Module):
    """Consecutive decoder layers, called as one layer: the unit loopserve compiles."""

    def __init__(self, *, layers: list[nn.Module], vllm_config: Any = None, prefix: str = ""):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, **kwargs)
        assert residual is not None
        return hidden_states, residual


def _compiled_class(role: str) -> type[Segment]:
    """`Segment` under its own name and code object, compiled by vLLM's decorator."""
    code = Segment.forward.__code__.replace()  # Dynamo caches graphs per code object
    forward = types.FunctionType(code, Segment.forward.__globals__, "forward")
    forward.__qualname__ = f"{role}.forward"
    cls = type(role, (Segment,), {"forward": forward, "__module__": __name__})
    return support_torch_compile(dynamic_arg_dims=DYNAMIC_DIMS)(cls)


_CLASSES = {role: _compiled_class(role) for role in ROLES}


def make_segment(role: str, layers: list[nn.Module], vllm_config: Any) -> Segment:
    """The `role` segment over `layers`, compiled as this engine compiles its model."""
    with set_current_vllm_config(vllm_config):
        return _CLASSES[role](layers=layers, vllm_config=vllm_config)
