"""vLLM's own model for the checkpoint's architecture, with its middle block run k times.

loopserve owns only the order in which layers run. For each supported architecture,
`Looped<Arch>` subclasses vLLM's `<Arch>` (its layers, weight loading, quantization,
rotary, norms and compiled forward, unchanged) and changes what one step runs:

- every token at k=1: vLLM's forward as it is, compiled as vLLM compiles it;
- otherwise: vLLM's forward run eagerly around compiled segments: the decoder's layer
  list is read as prelude segment, `LoopedBlock`, coda segment (`loop_segments.py`),
  with pass-throughs keeping its length. The decoder still embeds, scales and norms its
  own way; `LoopedBlock` runs the block's layers k times per token, k per request, one
  compiled segment per pass (`loop_passes.py`).

Exactness with the unrolled model needs one KV plane per executed (layer, pass): pass
p >= 2 of block layer i attends through a copy of that layer's own `Attention` (`planes`
below), registered under the virtual layer index (p - 1) * L + i, so vLLM allocates and
binds a cache for it as for any other layer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from torch import nn

from loopserve.server import vllm_hooks
from loopserve.server.loop_passes import LoopedBlock, PassAttention, attention_plane
from loopserve.server.loop_plan import (
    LOOPED_PREFIX,
    SUPPORTED_ARCHITECTURES,
    plan_from_hf_config,
)
from loopserve.server.loop_schedule import LoopSchedule
from loopserve.server.loop_segments import segment_compiler


class MissingLoopCounts(RuntimeError):
    """A batch reached the model without per-token loop counts (a vLLM hook did not run)."""


class LoopedCausalLM:
    """Mixed in before vLLM's `*ForCausalLM`: same weights and names, looped forward."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.loop_plan = plan = plan_from_hf_config(vllm_config.model_config.hf_config)
        decoder = self.model
        if len(decoder.layers) != plan.num_layers:
            raise ValueError(
                f"loop plan is for {plan.num_layers} layers, the model has {len(decoder.layers)}"
            )
        block = list(decoder.layers[plan.start : plan.end])
        static_context = vllm_config.compilation_config.static_forward_context
        # Registered as submodules, so vLLM's post-load processing (KV-cache scales
        # included) runs on every plane as on the layer's own attention.
        self.loop_planes = nn.ModuleList(
            nn.ModuleList(
                PassAttention(
                    attention_plane(
                        layer, (pass_index - 1) * plan.num_layers + index, static_context
                    )
                )
                for index, layer in zip(range(plan.start, plan.end), block, strict=True)
            )
            for pass_index in range(2, plan.max_loops + 1)
        )
        self._run_segment = segment_compiler(vllm_config.compilation_config)
        self._block: LoopedBlock | None = None
        self._looped_layers: list[Any] = []
        self._schedule: LoopSchedule | None = None

    def _build_looped_layers(self) -> None:
        """The looped step's layer list: prelude, block, coda as segments.

        Built at the first looped step, after vLLM has loaded and post-processed the
        weights the segments' layer copies share.
        """
        plan, layers = self.loop_plan, list(self.model.layers)
        self._block = LoopedBlock(
            layers[plan.start : plan.end], list(self.loop_planes), self._run_segment
        )
        runs = [layers[: plan.start], [self._block], layers[plan.end :]]
        spans = [plan.start, plan.block_size, plan.num_layers - plan.end]
        self._looped_layers = []
        for run, span in zip(runs, spans, strict=True):
            if span:
                head = run[0] if run[0] is self._block else self._run_segment(run)
                self._looped_layers += [head, *[_pass_through] * (span - 1)]

    @contextmanager
    def looping(self, token_loops: np.ndarray) -> Iterator[LoopSchedule]:
        """Run the forwards inside this block with these per-token loop counts."""
        device = next(self.parameters()).device
        self._schedule = LoopSchedule.build(token_loops, device)
        try:
            yield self._schedule
        finally:
            self._schedule = None

    def forward(self, input_ids: Any, positions: Any, *args: Any, **kwargs: Any) -> Any:
        schedule = self._schedule
        if schedule is None:
            raise MissingLoopCounts(
                "the looped model got a batch without per-token loop counts: "
                "loopserve's vLLM hooks are not active in this process"
            )
        if schedule.max_loops == 1:
            return super().forward(input_ids, positions, *args, **kwargs)
        if positions.shape[-1] != schedule.num_tokens:
            raise MissingLoopCounts(
                f"loop counts cover {schedule.num_tokens} tokens, "
                f"the batch has {positions.shape[-1]}"
            )
        if self._block is None:
            self._build_looped_layers()
        assert self._block is not None
        self._block.schedule = schedule
        decoder = self.model
        # Shadow the decoder's layer list for this one forward (an instance attribute
        # wins over nn.Module's registry); its registered layers stay untouched.
        decoder.__dict__["layers"] = self._looped_layers
        try:
            with vllm_hooks.eager_model_calls():
                return super().forward(input_ids, positions, *args, **kwargs)
        finally:
            del decoder.__dict__["layers"]
            self._block.schedule = None


def _pass_through(positions: Any, hidden_states: Any, residual: Any, **kwargs: Any) -> Any:
    """Stands in for the layers a segment or `LoopedBlock` before it already ran."""
    return hidden_states, residual


@functools.cache
def looped_class(architecture: str) -> type:
    """`Looped<architecture>`: vLLM's class for the architecture with the looped forward."""
    base = vllm_hooks.vllm_model_class(architecture)
    return type(LOOPED_PREFIX + architecture, (LoopedCausalLM, base), {"__module__": __name__})


def __getattr__(name: str) -> type:
    """vLLM loads `loopserve.server.looped_model:Looped<Arch>` lazily, by name."""
    architecture = name.removeprefix(LOOPED_PREFIX)
    if name.startswith(LOOPED_PREFIX) and architecture in SUPPORTED_ARCHITECTURES:
        return looped_class(architecture)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
