"""Compiled segments of a looped step: the prelude, one block pass, the coda.

vLLM compiles a model's forward as one traced graph, which fixes the order of its
layers; a looped step's order depends on its batch (how many passes, which rows run
each). loopserve therefore compiles the runs of layers that are the same in every step
(`Segment`s: prelude, each block pass, coda) as separate graphs, with the pass loop,
row gathers and the loop step between them in Python. Each segment is compiled with the
backend and Inductor options vLLM compiles the model with; with `--enforce-eager`
(compilation mode NONE) segments run eagerly, as the rest of the model does.

Batch rows vary per step, so dimension 0 (tokens) is dynamic and each segment compiles
once (`CompiledSegment`), in a looped dummy run at vLLM's warm-up (`vllm_hooks`). On
CUDA, vLLM's piecewise backend captures CUDA graphs only for the forward it compiles
itself; segments use plain Inductor, so looped steps run compiled but without graphs.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from vllm.config import CompilationMode

logger = logging.getLogger("loopserve")

# How a decoder layer is called in vLLM: (positions, hidden_states, residual) ->
# (hidden_states, residual). Segments and `LoopedBlock` are called the same way.
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
    """A `Segment` compiled once, then run without Dynamo's guards, as vLLM runs its model.

    As in vLLM's trace-once mode, the first call with at least two rows traces the
    segment with its row dimension dynamic, and every later call, of any row count (one
    included), runs that graph without evaluating guards. Dynamo keys compiled graphs by
    code object, so each segment compiles its own copy of `Segment.forward`'s code;
    without guards they would otherwise all run the first segment's graph. Calls with
    fewer than two rows before the graph exists run eagerly (Dynamo would specialize a
    graph to one row).
    """

    def __init__(self, segment: Segment, backend: str, options: dict[str, Any]) -> None:
        self.segment = segment
        self.code = Segment.forward.__code__.replace()
        forward = types.FunctionType(self.code, Segment.forward.__globals__, "forward")
        self.compiled = False
        self._compiled = torch.compile(
            types.MethodType(forward, segment),
            backend=backend,
            fullgraph=True,
            options={**options, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe},
        )

    def __call__(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.compiled:
            if hidden_states.shape[0] < 2:
                return self.segment(positions, hidden_states, residual, **kwargs)
            torch._dynamo.mark_dynamic(positions, positions.dim() - 1)
            torch._dynamo.mark_dynamic(hidden_states, 0)
            if residual is not None:
                torch._dynamo.mark_dynamic(residual, 0)
            self.compiled = True
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
