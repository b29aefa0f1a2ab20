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

Under pipeline parallelism the block lies inside one stage (`vllm_hooks` refuses a
block across a stage boundary); that stage loops it and holds its planes, every other
stage runs vLLM's forward unchanged.
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
from loopserve.server.loop_segments import CompiledSegment, segment_compiler


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
        # This pipeline stage's layers; the others are vLLM's placeholders.
        self._stage = decoder.start_layer, decoder.end_layer
        self.holds_block = self._stage[0] <= plan.start and plan.end <= self._stage[1]
        block = list(decoder.layers[plan.start : plan.end]) if self.holds_block else []
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
            for pass_index in range(2, plan.max_loops + 1 if self.holds_block else 2)
        )
        self._run_segment = segment_compiler(vllm_config.compilation_config)
        self._block: LoopedBlock | None = None
        self._looped_layers: list[Any] = []
        self._segments: list[Any] = []
        self._loops: np.ndarray | int | None = None

    def _build_looped_layers(self) -> None:
        """The looped step's layer list: this stage's prelude, block, coda as segments.

        Built at the first looped step or warm-up, after vLLM has loaded and
        post-processed the weights the segments' layer copies share. Entries outside
        this stage stay vLLM's placeholders (the decoder never calls them).
        """
        plan, layers = self.loop_plan, list(self.model.layers)
        first, last = self._stage
        self._block = block = LoopedBlock(
            layers[plan.start : plan.end], list(self.loop_planes), self._run_segment
        )
        prelude, coda = layers[first : plan.start], layers[plan.end : last]
        head = [self._run_segment(prelude)] if prelude else []
        tail = [self._run_segment(coda)] if coda else []
        self._segments = [*head, *block.passes, *tail]
        self._looped_layers = [
            *layers[:first],
            *head,
            *[_pass_through] * (len(prelude) - len(head)),
            block,
            *[_pass_through] * (plan.block_size - 1),
            *tail,
            *[_pass_through] * (len(coda) - len(tail)),
            *layers[last:],
        ]

    @contextmanager
    def looping(self, token_loops: np.ndarray | int) -> Iterator[None]:
        """Run the forwards inside this block with these per-token loop counts.

        An int gives every token that count, however many tokens the forward gets:
        vLLM pads its dummy runs to a size only it knows.
        """
        self._loops = token_loops
        try:
            yield
        finally:
            self._loops = None

    def needs_warm_up(self) -> bool:
        """Whether a looped step would compile segments that are not compiled yet."""
        if not self.holds_block:
            return False
        if self._block is None:
            self._build_looped_layers()
        return any(
            isinstance(segment, CompiledSegment) and not segment.compiled
            for segment in self._segments
        )

    def forward(self, input_ids: Any, positions: Any, *args: Any, **kwargs: Any) -> Any:
        loops, num_tokens = self._loops, positions.shape[-1]
        if loops is None:
            raise MissingLoopCounts(
                "the looped model got a batch without per-token loop counts: "
                "loopserve's vLLM hooks are not active in this process"
            )
        if isinstance(loops, int):
            loops = np.full(num_tokens, loops)
        elif len(loops) != num_tokens:
            raise MissingLoopCounts(
                f"loop counts cover {len(loops)} tokens, the batch has {num_tokens}"
            )
        if not self.holds_block:
            return super().forward(input_ids, positions, *args, **kwargs)
        schedule = LoopSchedule.build(loops, positions.device)
        if schedule.max_loops == 1:
            return super().forward(input_ids, positions, *args, **kwargs)
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
