"""The block's passes: each block layer's own forward, k times per token, k per request.

Pass p runs on the rows whose request asked for at least p passes (`LoopSchedule`;
pass 1 on every row): their projections, norms and MLP see only those rows, through
copies of the block's layers (`layer_for_pass`: same weights) whose attention is a
`PassAttention` (the layer's own attention in pass 1, one KV plane per later pass,
picked at run time). Every pass runs the same segment (`loop_segments`), so the block
compiles once whatever `--max-loops`. Rows that finished keep the output of their last
pass, which is what the layers after the block receive.

Hand-over between passes, two exact paths:
- where the fused loop step runs (Triton: CUDA) and the block's entry norm is exactly
  vLLM's `RMSNorm` (Llama, Mistral, Qwen2, Qwen3, Phi-3): one kernel
  (`loopserve.kernels.loop_step`: residual add, RMSNorm, compaction of the continuing
  rows, write-back of the finished ones) computes the next pass's normed input, so the
  segment's entry norm is bypassed and pass 1's runs before it;
- otherwise (CPU; Gemma-2/3's `(1 + w)` norms): the continuing rows' (hidden, residual)
  pair is gathered and the layer applies its own entry norm.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm

from loopserve.kernels.loop_step import kernel_backend, loop_step_triton
from loopserve.server import vllm_hooks
from loopserve.server.loop_context import current_loop_context
from loopserve.server.loop_segments import LayerCall
from loopserve.server.pass_kv import PassAttentionSpec


def _attention_path(layer: nn.Module) -> tuple[list[str], Attention]:
    """Attribute path to the layer's one `Attention`, and the module."""
    found = [(name, m) for name, m in layer.named_modules() if isinstance(m, Attention)]
    if len(found) != 1:
        raise ValueError(
            f"loopserve loops decoder layers with exactly one attention module; "
            f"{type(layer).__name__} has {len(found)}"
        )
    path, module = found[0]
    return path.split("."), module


def attention_plane(
    layer: nn.Module, loop_pass: int, virtual_index: int, vllm_config: Any
) -> Attention:
    """The layer's `Attention` for pass `loop_pass`, under the name of virtual layer
    `virtual_index`.

    A pass attends exactly as the layer's first pass does (same implementation,
    settings and parameters); only the name, hence the KV cache vLLM binds, and the
    KV-cache spec (`PassAttentionSpec`: KV held by deep requests only) differ.
    """
    _, base = _attention_path(layer)
    name, count = re.subn(r"\.layers\.\d+\.", f".layers.{virtual_index}.", base.layer_name, count=1)
    if count != 1:
        raise ValueError(f"cannot derive a pass layer name from {base.layer_name!r}")
    plane = vllm_hooks.attention_under_name(base, name, vllm_config)
    # vLLM's runner asks each attention layer for its spec (`get_kv_cache_spec`).
    plane.get_kv_cache_spec = functools.partial(_plane_kv_spec, base, loop_pass)
    return plane


def _plane_kv_spec(base: Attention, loop_pass: int, vllm_config: Any) -> PassAttentionSpec:
    block_size = vllm_config.cache_config.block_size
    return PassAttentionSpec.of_layer(base.get_kv_cache_spec(vllm_config), loop_pass, block_size)


class PassAttention(nn.Module):
    """Where a block layer's attention sits in its passes: the running pass's attention.

    One module serves every pass (so one compiled graph does): it calls
    `loopserve::pass_attention`, an op opaque to the compiler, with the names of the
    layer's own attention (pass 1) and of its planes for passes 2..K, and the op picks
    the running pass's attention from the step's `LoopContext`.
    """

    def __init__(self, layer: nn.Module, planes: list[Attention]) -> None:
        super().__init__()
        # Registered here so vLLM's post-load processing reaches them; the layer's own
        # attention already is, as the layer's submodule.
        self.planes = nn.ModuleList(planes)
        _, own = _attention_path(layer)
        # Custom ops take no list of strings: the names travel comma-joined.
        self.plane_names = ",".join(a.layer_name for a in [own, *planes])

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs):
        if kwargs:
            raise TypeError(f"loopserve's pass attention takes no options, got {sorted(kwargs)}")
        return torch.ops.loopserve.pass_attention(query, key, value, self.plane_names)


PASS_ATTENTION_OP = "loopserve::pass_attention"


@torch.library.custom_op(PASS_ATTENTION_OP, mutates_args=())
def pass_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plane_names: str
) -> torch.Tensor:
    """The running pass's attention, on that pass's rows.

    Pass 1 is the layer's own attention over the whole batch. vLLM built each later
    plane's attention metadata and slot mapping for the requests that run its pass only
    (the engine hooks narrow them per step), so the rows given here are the whole batch
    the plane sees: the other requests cost it nothing and write nothing.
    """
    context = current_loop_context()
    assert context.schedule is not None, "runs in a looped step"
    attention = vllm_hooks.attention_layer(_split_names(plane_names)[context.pass_index - 1])
    return attention(query, key, value)


@functools.cache
def _split_names(plane_names: str) -> tuple[str, ...]:
    """The attention names of one block layer, split once rather than at every call."""
    return tuple(plane_names.split(","))


@pass_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plane_names: str):
    plane = vllm_hooks.attention_layer(_split_names(plane_names)[0])
    return query.new_empty((query.shape[0], plane.num_heads * plane.head_size_v))


def layer_for_pass(layer: nn.Module, attention: PassAttention, prenormed: bool) -> nn.Module:
    """The layer as its passes run it: same modules and weights, the pass's attention.

    Only the modules on the path to the attention (and the layer itself) are copied;
    everything else, parameters included, is the layer's own.
    """
    path, _ = _attention_path(layer)
    copy_ = _shallow_module_copy(layer)
    parent = copy_
    for name in path[:-1]:
        child = _shallow_module_copy(parent._modules[name])
        parent._modules[name] = child
        parent = child
    parent._modules[path[-1]] = attention
    if prenormed:
        copy_._modules["input_layernorm"] = _Prenormed()
    return copy_


def _shallow_module_copy(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


class _Prenormed(nn.Module):
    """The entry norm of a pass whose input the loop step already normed."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, residual


class LoopedBlock:
    """Stands in for the block's first layer in a step and runs the block's layers k
    times per token.

    Called like a vLLM decoder layer, `(positions, hidden_states, residual, **kwargs) ->
    (hidden_states, residual)`, inside a step whose `LoopContext` holds the schedule.
    Every pass runs the block layers' `layer_for_pass` copies as one segment
    (`make_segment`: compiled or eager, as the engine runs models).
    """

    def __init__(
        self,
        layers: list[nn.Module],
        attentions: list[PassAttention],
        make_segment: Callable[[str, list[nn.Module]], LayerCall],
    ) -> None:
        entry = layers[0]
        norm = getattr(entry, "input_layernorm", None)
        # The fused loop step (Triton) reproduces exactly vLLM's RMSNorm (not a
        # subclass, not GemmaRMSNorm) bit for bit; elsewhere the layer's own norm runs.
        self.fused_entry: RMSNorm | None = (
            norm
            if type(norm) is RMSNorm
            and norm.has_weight
            and norm.variance_size_override is None
            and kernel_backend(norm.weight.device) == "triton"
            else None
        )
        prenormed = self.fused_entry is not None
        self.segment = make_segment(
            "LoopBlock",
            [
                layer_for_pass(layer, attention, prenormed and i == 0)
                for i, (layer, attention) in enumerate(zip(layers, attentions, strict=True))
            ],
        )

    def __call__(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        context = current_loop_context()
        schedule = context.schedule
        assert schedule is not None, "LoopedBlock runs only inside a looped forward"
        fused = self.fused_entry
        h, r = hidden_states, residual
        if fused is not None:  # the segment's entry norm is bypassed: pass 1's runs here
            h, r = (fused(h), h) if r is None else fused(h, r)
        context.pass_index = 1
        if schedule.max_loops == 1:
            return self.segment(positions, h, r, **kwargs)
        out: tuple[torch.Tensor, torch.Tensor] | None = None
        for p in range(schedule.max_loops):
            full = schedule.full_pass[p]
            rows = schedule.pass_rows[p]
            context.pass_index = p + 1
            h, r = self.segment(
                positions if full else positions.index_select(-1, rows), h, r, **kwargs
            )
            num_rows, num_next = rows.shape[0], schedule.num_next[p]
            if full and num_next == 0:
                return h, r  # every row stops here: the pair already is the coda's input
            if out is None:
                out = (torch.empty_like(h), torch.empty_like(r))
            if fused is not None:
                step = loop_step_triton(
                    h, r, rows, schedule.next_slot[p], num_next,
                    fused.weight, fused.variance_epsilon, *out,
                )  # fmt: skip
                h, r = step.next_hidden, step.next_residual
                continue
            if num_next < num_rows:
                done, done_rows, keep = schedule.done[p], schedule.done_rows[p], schedule.keep[p]
                out[0].index_copy_(0, done_rows, h.index_select(0, done))
                out[1].index_copy_(0, done_rows, r.index_select(0, done))
                h, r = h.index_select(0, keep), r.index_select(0, keep)
        assert out is not None
        return out
