"""The block's passes: each block layer's own forward, k times per token, k per request.

Pass 1 is the block as vLLM runs it, on every row. Pass p >= 2 runs on the rows whose
request asked for at least p passes (`LoopSchedule`): their projections, norms and MLP
see only those rows, through copies of the block's layers (`layer_for_pass`: same
weights) whose attention is that pass's `PassAttention` (its own KV plane). Each pass
is one segment, compiled as the engine compiles models (`loop_segments`). Rows that
finished keep the output of their last pass, which is what the layers after the block
receive.

Hand-over between passes, two exact paths, chosen per architecture by the block's first
layer:
- its entry norm is vLLM's `RMSNorm` (Llama, Mistral, Qwen2, Qwen3, Phi-3): the fused
  loop step (`loopserve.kernels.loop_step`: residual add, RMSNorm, compaction of the
  continuing rows, write-back of the finished ones; one Triton kernel on CUDA) computes
  the next pass's normed input, and the entry norm is bypassed for that pass;
- any other entry norm (Gemma-2/3's `(1 + w)` `GemmaRMSNorm` between sandwich norms):
  the continuing rows' (hidden, residual) pair is gathered and the layer applies its own
  norm, in PyTorch.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm

from loopserve.kernels.loop_step import loop_step
from loopserve.server import vllm_hooks
from loopserve.server.loop_schedule import LoopSchedule
from loopserve.server.loop_segments import LayerCall


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


def attention_plane(layer: nn.Module, virtual_index: int, static_context: dict) -> Attention:
    """A copy of the layer's `Attention` with its own name, hence its own KV cache.

    The copy shares the original's implementation, settings (heads, scale, sliding
    window, softcap, alibi) and parameters (quantization and KV-cache scales), so a pass
    attends exactly as the layer's first pass does; only the name under which vLLM
    binds a cache differs.
    """
    _, base = _attention_path(layer)
    name, count = re.subn(r"\.layers\.\d+\.", f".layers.{virtual_index}.", base.layer_name, count=1)
    if count != 1:
        raise ValueError(f"cannot derive a pass layer name from {base.layer_name!r}")
    if name in static_context:
        raise ValueError(f"duplicate attention layer name {name!r}")
    plane = copy.copy(base)
    plane._parameters = dict(base._parameters)
    plane._buffers = dict(base._buffers)
    plane._modules = dict(base._modules)
    plane.layer_name = name
    plane.kv_cache = torch.tensor([])
    plane.loop_rows, plane.loop_num_tokens = None, 0
    static_context[name] = plane
    return plane


class PassAttention(nn.Module):
    """Where a block layer's attention sits during pass p >= 2: that pass's plane.

    It calls `loopserve::pass_attention`, an opaque op to a compiled segment, because
    the rows it runs on change every step.
    """

    def __init__(self, plane: Attention) -> None:
        super().__init__()
        self.plane = plane

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs):
        if kwargs:
            raise TypeError(f"loopserve's pass attention takes no options, got {sorted(kwargs)}")
        return torch.ops.loopserve.pass_attention(query, key, value, self.plane.layer_name)

    def bind(self, rows: torch.Tensor | None, num_tokens: int) -> None:
        """The batch rows of the pass about to run (None: all `num_tokens` of them)."""
        self.plane.loop_rows = rows
        self.plane.loop_num_tokens = num_tokens


@torch.library.custom_op("loopserve::pass_attention", mutates_args=())
def pass_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_name: str
) -> torch.Tensor:
    """One pass's attention through its plane, on the rows `PassAttention.bind` named.

    The step's attention metadata describes every row of the batch, so a subset's q/k/v
    are scattered into zeros and the other rows' outputs dropped. Their K/V land in
    this plane at their slots, which their requests never read (they did not ask for
    this pass).
    """
    return _plane_attention(vllm_hooks.attention_layer(layer_name), query, key, value)


def _plane_attention(
    plane: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    rows = plane.loop_rows
    if rows is None:
        return plane(query, key, value)
    q, k, v = (
        t.new_zeros((plane.loop_num_tokens, *t.shape[1:])).index_copy_(0, rows, t)
        for t in (query, key, value)
    )
    return plane(q, k, v).index_select(0, rows)


@pass_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_name: str):
    plane = vllm_hooks.attention_layer(layer_name)
    return query.new_empty((query.shape[0], plane.num_heads * plane.head_size_v))


def layer_for_pass(layer: nn.Module, attention: PassAttention, prenormed: bool) -> nn.Module:
    """The layer as pass p >= 2 runs it: same modules and weights, that pass's attention.

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
    """Stands in for the block's first layer in a looped step and runs the whole block.

    Called like a vLLM decoder layer, `(positions, hidden_states, residual, **kwargs) ->
    (hidden_states, residual)`, with the step's schedule set by the model beforehand.
    Each pass is one segment (`run_segment`: compiled or eager, as the engine runs
    models); pass 1 is the block's own layers, pass p >= 2 their `layer_for_pass` copies.
    """

    def __init__(
        self,
        layers: list[nn.Module],
        planes: list[nn.ModuleList],
        run_segment: Callable[[list[nn.Module]], LayerCall],
    ) -> None:
        entry = layers[0]
        norm = getattr(entry, "input_layernorm", None)
        # Exactly vLLM's RMSNorm (not a subclass, not GemmaRMSNorm): the loop step
        # reproduces its fused add + norm bit for bit.
        self.fused_entry: RMSNorm | None = (
            norm
            if type(norm) is RMSNorm and norm.has_weight and norm.variance_size_override is None
            else None
        )
        self.planes = planes  # planes[p - 2][i]: pass p of block layer i
        prenormed = self.fused_entry is not None
        self.passes = [run_segment(layers)] + [
            run_segment(
                [
                    layer_for_pass(layer, attention, prenormed and i == 0)
                    for i, (layer, attention) in enumerate(zip(layers, pass_planes, strict=True))
                ]
            )
            for pass_planes in planes
        ]
        self.schedule: LoopSchedule | None = None

    def __call__(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        schedule = self.schedule
        assert schedule is not None, "LoopedBlock runs only inside a looped forward"
        fused = self.fused_entry
        out: tuple[torch.Tensor, torch.Tensor] | None = None
        h, r = hidden_states, residual
        for p in range(schedule.max_loops):
            full = schedule.full_pass[p]
            rows = schedule.pass_rows[p]
            pass_positions = positions if full else positions.index_select(-1, rows)
            if p > 0:
                for attention in self.planes[p - 1]:
                    attention.bind(None if full else rows, schedule.num_tokens)
            h, r = self.passes[p](pass_positions, h, r, **kwargs)
            num_rows, num_next = rows.shape[0], schedule.num_next[p]
            if full and num_next == 0:
                return h, r  # every row stops here: the pair already is the coda's input
            if out is None:
                out = (torch.empty_like(h), torch.empty_like(r))
            if fused is not None:
                step = loop_step(
                    h,
                    r,
                    rows,
                    schedule.next_slot[p],
                    num_next,
                    fused.weight,
                    fused.variance_epsilon,
                    *out,
                )
                h = step.next_hidden
                r = step.next_residual
                continue
            if num_next < num_rows:
                done, done_rows, keep = schedule.done[p], schedule.done_rows[p], schedule.keep[p]
                out[0].index_copy_(0, done_rows, h.index_select(0, done))
                out[1].index_copy_(0, done_rows, r.index_select(0, done))
                h, r = h.index_select(0, keep), r.index_select(0, keep)
        assert out is not None
        return out
