"""vLLM's own model for the checkpoint's architecture, with its middle block run k times.

loopserve owns only the order in which layers run. For each supported architecture,
`Looped<Arch>` subclasses vLLM's `<Arch>` (its layers, weight loading, quantization,
rotary, norms and compiled forward, unchanged) and changes what one step runs:

- every token at k=1, where vLLM's whole-model graph pays for itself (CUDA graphs, or
  no compilation at all): vLLM's forward as it is, compiled as vLLM compiles it;
- otherwise: vLLM's decoder forward, run eagerly over another layer list (prelude
  segment, `LoopedBlock`, coda segment; `_LoopedDecoder`). On vLLM's CPU default
  (trace-once, no CUDA graphs) k=1 steps run this way too: the segments compile anyway
  for looped steps, so vLLM's graph of the same layers is never compiled (start-up,
  RESULTS 7). The decoder still embeds, scales and norms its own way; `LoopedBlock`
  runs the block's layers k times per token, k per request (`loop_passes.py`); the
  segments compile as vLLM compiles models (`loop_segments.py`). What a step loops is
  read from its `LoopContext`.

Exactness with the unrolled model needs one KV plane per executed (layer, pass): pass
p >= 2 of block layer i attends through a copy of that layer's own `Attention`,
registered under the virtual layer index (p - 1) * L + i, so vLLM allocates and binds
a cache for it as for any other layer, in KV-cache groups of pass p held only by the
requests that run pass p (`pass_kv`).

Under pipeline parallelism the block lies inside one stage (`vllm_hooks` refuses a
block across a stage boundary); that stage loops it and holds its planes, every other
stage runs vLLM's forward unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from vllm.config import CompilationMode

from loopserve.server import vllm_hooks
from loopserve.server.loop_context import current_loop_context
from loopserve.server.loop_passes import (
    PASS_ATTENTION_OP,
    LoopedBlock,
    PassAttention,
    attention_plane,
)
from loopserve.server.loop_plan import (
    LOOPED_PREFIX,
    SUPPORTED_ARCHITECTURES,
    plan_from_hf_config,
)
from loopserve.server.loop_segments import make_segment


class LoopedCausalLM:
    """Mixed in before vLLM's `*ForCausalLM`: same weights and names, looped forward."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.loop_plan = plan = plan_from_hf_config(vllm_config.model_config.hf_config)
        layers, first, last = vllm_hooks.decoder_stage(self.model)
        if len(layers) != plan.num_layers:
            raise ValueError(
                f"loop plan is for {plan.num_layers} layers, the model has {len(layers)}"
            )
        # This pipeline stage's layers are first..last; the others are vLLM's placeholders.
        self.holds_block = first <= plan.start and plan.end <= last
        block = layers[plan.start : plan.end] if self.holds_block else []
        vllm_hooks.check_model_surface(self.model, block)
        # One per block layer: its own attention (pass 1) and its planes for passes
        # 2..K, registered as submodules so vLLM's post-load processing (KV-cache
        # scales included) runs on every plane as on the layer's own attention.
        self.loop_attention = nn.ModuleList(
            PassAttention(
                layer,
                [
                    attention_plane(layer, p, (p - 1) * plan.num_layers + index, vllm_config)
                    for p in range(2, plan.max_loops + 1)
                ],
            )
            for index, layer in enumerate(block, start=plan.start)
        )
        # Each plane's layer name, and the pass it serves.
        self.pass_planes: dict[str, int] = {
            plane.layer_name: loop_pass
            for attention in self.loop_attention
            for loop_pass, plane in enumerate(attention.planes, start=2)
        }
        splitting_ops = vllm_config.compilation_config.splitting_ops
        if splitting_ops and PASS_ATTENTION_OP not in splitting_ops:
            # Piecewise compilation (CUDA) splits graphs at attention: the pass
            # attention, whose rows change every step, must be a split point too.
            splitting_ops.append(PASS_ATTENTION_OP)
        self._vllm_config = vllm_config
        mode = vllm_config.compilation_config.mode
        self.k1_runs_segments = mode in (
            CompilationMode.DYNAMO_TRACE_ONCE,
            CompilationMode.STOCK_TORCH_COMPILE,
        )
        self._warmed_up = mode == CompilationMode.NONE or not self.holds_block
        self._looped_decoder: _LoopedDecoder | None = None

    def looped_decoder(self) -> _LoopedDecoder:
        """The decoder as looped steps run it; built at the first looped dummy run.

        Built after vLLM has loaded and post-processed the weights, which the block
        layers' pass copies share.
        """
        if self._looped_decoder is None:
            self._looped_decoder = _LoopedDecoder(self)
        return self._looped_decoder

    def take_warm_up(self) -> bool:
        """True once, at start-up, where this stage loops and compiles: the runner hook
        then runs a looped dummy step, so every segment compiles before any request."""
        warm = self._warmed_up
        self._warmed_up = True
        return not warm

    def forward(self, input_ids: Any, positions: Any, *args: Any, **kwargs: Any) -> Any:
        context = current_loop_context()
        schedule = context.start(positions.shape[-1], positions.device)
        if not self.holds_block or (schedule.max_loops == 1 and not self.k1_runs_segments):
            return super().forward(input_ids, positions, *args, **kwargs)
        # Every family's `*ForCausalLM.forward` is one call of its decoder; called by
        # `forward`, vLLM's decoder runs eagerly (its compiled graph has k=1's layer
        # order) over the looped layer list, and the segments inside run compiled.
        view = self.looped_decoder().view
        return type(self.model).forward(view, input_ids, positions, *args, **kwargs)


class _LoopedDecoder:
    """vLLM's decoder as a looped step runs it: the same decoder, another layer list.

    Each family's decoder forward embeds, scales, hands over between pipeline stages
    and norms its own way, then calls `self.layers[start:end]` in order; driving that
    forward on `view` (the decoder with this stage's prelude segment, `LoopedBlock` and
    coda segment as its layers, pass-throughs keeping the list's length) keeps all of
    that vLLM's, and writes nothing on the decoder. Entries outside this stage stay
    vLLM's placeholders (the decoder never calls them).
    """

    def __init__(self, model: LoopedCausalLM) -> None:
        plan = model.loop_plan
        layers, first, last = vllm_hooks.decoder_stage(model.model)

        def segment(role: str, run: list[nn.Module]) -> Any:
            return make_segment(role, run, model._vllm_config)

        def runs_as(role: str, run: list[nn.Module]) -> list[Any]:
            """`run`'s entries in the view: its segment, then pass-throughs."""
            return [segment(role, run), *[_pass_through] * (len(run) - 1)] if run else []

        self.block = LoopedBlock(layers[plan.start : plan.end], list(model.loop_attention), segment)
        head = runs_as("LoopPrelude", layers[first : plan.start])
        tail = runs_as("LoopCoda", layers[plan.end : last])
        self.segments = [*head[:1], self.block.segment, *tail[:1]]
        self.view = vllm_hooks.decoder_with_layers(
            model.model,
            [
                *layers[:first],
                *head,
                self.block,
                *[_pass_through] * (plan.block_size - 1),
                *tail,
                *layers[last:],
            ],
        )


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
