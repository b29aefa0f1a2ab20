"""Compiled segments of a looped step: the prelude, one block pass, the coda.

vLLM compiles a model's forward as one traced graph, which fixes the order of its
layers; a looped step's order depends on its batch (how many passes, which rows run
each). loopserve therefore compiles the runs of layers that are the same in every step
(`Segment`s: prelude, each block pass, coda) as separate graphs, with the pass loop,
row gathers and the loop step between them in Python. Each segment is compiled with the
backend and Inductor options vLLM compiles the model with; with `--enforce-eager`
(compilation mode NONE) segments run eagerly, as the rest of the model does.

Batch rows vary per step, so dimension 0 (tokens) is marked dynamic: a segment compiles
at most twice (Dynamo specializes a one-row batch), then serves every row count. On
CUDA, vLLM's piecewise backend captures CUDA graphs only for the forward it compiles
itself; segments use plain Inductor, so looped steps run compiled but without graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from vllm.config import CompilationMode

logger = logging.getLogger("loopserve")

LayerCall = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class Segment(nn.Module):
    """Consecutive decoder layers, called as one layer: the unit loopserve compiles."""

    def __init__(self, layers: list[nn.Module]) -> None:
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


class CompiledSegment:
    """A `Segment` run through `torch.compile`, its token dimension dynamic."""

    # Every segment's graph is a cache entry of the one `Segment.forward` code object,
    # and a plan with max_loops k has k + 2 segments, each compiled up to twice. Past
    # the limit Dynamo would fall back to eager silently; here it raises instead.
    _RECOMPILE_LIMIT = 64

    def __init__(self, segment: Segment, backend: str, options: dict[str, Any]) -> None:
        self.segment = segment
        self._compiled = torch.compile(
            segment.forward, backend=backend, options=options or None, fullgraph=True
        )

    def __call__(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        torch._dynamo.maybe_mark_dynamic(positions, positions.dim() - 1)
        torch._dynamo.maybe_mark_dynamic(hidden_states, 0)
        if residual is not None:
            torch._dynamo.maybe_mark_dynamic(residual, 0)
        with torch._dynamo.config.patch(
            recompile_limit=self._RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True
        ):
            return self._compiled(positions, hidden_states, residual, **kwargs)


def segment_compiler(compilation_config: Any) -> Callable[[list[nn.Module]], LayerCall]:
    """How this engine runs a segment: compiled as vLLM compiles its model, or eagerly."""
    if compilation_config.mode == CompilationMode.NONE:
        return Segment
    backend = compilation_config.backend or "inductor"
    if backend not in ("eager", "inductor"):
        logger.info(
            "loopserve: looped segments compile with Inductor, not the custom backend %r",
            backend,
        )
        backend = "inductor"
    options = dict(compilation_config.inductor_compile_config) if backend == "inductor" else {}

    def compile_segment(layers: list[nn.Module]) -> LayerCall:
        return CompiledSegment(Segment(layers), backend, options)

    return compile_segment
