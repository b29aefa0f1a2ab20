"""The block's passes: each block layer's own forward, k times per token, k per request.

Pass 1 is the block as vLLM runs it, on every row. Pass p >= 2 runs on the rows whose
request asked for at least p passes (`LoopSchedule`): their projections, norms and MLP
see only those rows, and each layer's attention is swapped for that pass's
`PassAttention` (its own KV plane). Rows that finished keep the output of their last
pass, which is what the layers after the block receive.

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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm

from loopserve.kernels.loop_step import loop_step
from loopserve.server.loop_schedule import LoopSchedule


def _attention_site(layer: nn.Module) -> tuple[nn.Module, str, Attention]:
    """(parent module, attribute name, module) of the layer's one `Attention`."""
    found = [(name, m) for name, m in layer.named_modules() if isinstance(m, Attention)]
    if len(found) != 1:
        raise ValueError(
            f"loopserve loops decoder layers with exactly one attention module; "
            f"{type(layer).__name__} has {len(found)}"
        )
    path, module = found[0]
    parent_path, _, name = path.rpartition(".")
    return layer.get_submodule(parent_path), name, module


def attention_plane(layer: nn.Module, virtual_index: int, static_context: dict) -> Attention:
    """A copy of the layer's `Attention` with its own name, hence its own KV cache.

    The copy shares the original's implementation, settings (heads, scale, sliding
    window, softcap, alibi) and parameters (quantization and KV-cache scales), so a pass
    attends exactly as the layer's first pass does; only the name under which vLLM
    binds a cache differs.
    """
    _, _, base = _attention_site(layer)
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
    static_context[name] = plane
    return plane


class PassAttention(nn.Module):
    """Where a block layer's attention sits during pass p >= 2: that pass's plane.

    When the pass runs a subset of rows, attention still sees the full batch (the
    step's attention metadata describes every row): the rows' q/k/v are scattered into
    zeros, and the other rows' outputs are dropped. Their K/V land in this plane at
    their slots, which their requests never read (they did not ask for this pass).
    """

    def __init__(self, plane: Attention) -> None:
        super().__init__()
        self.plane = plane
        self.rows: torch.Tensor | None = None
        self.num_tokens = 0

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs):
        rows = self.rows
        if rows is None:
            return self.plane(query, key, value, **kwargs)
        q, k, v = (
            t.new_zeros((self.num_tokens, *t.shape[1:])).index_copy_(0, rows, t)
            for t in (query, key, value)
        )
        return self.plane(q, k, v, **kwargs).index_select(0, rows)


class _Prenormed(nn.Module):
    """The entry norm of a pass whose input the loop step already normed."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, residual


class LoopedBlock:
    """Stands in for the block's first layer in a looped step and runs the whole block.

    Called like a vLLM decoder layer, `(positions, hidden_states, residual, **kwargs) ->
    (hidden_states, residual)`, with the step's schedule set by the model beforehand.
    """

    def __init__(self, layers: list[nn.Module], planes: list[nn.ModuleList]) -> None:
        self.layers = layers
        self.planes = planes  # planes[p - 2][i]: pass p of block layer i
        self.sites = [_attention_site(layer) for layer in layers]
        entry = layers[0]
        norm = getattr(entry, "input_layernorm", None)
        # Exactly vLLM's RMSNorm (not a subclass, not GemmaRMSNorm): the loop step
        # reproduces its fused add + norm bit for bit.
        self.fused_entry: RMSNorm | None = (
            norm
            if type(norm) is RMSNorm and norm.has_weight and norm.variance_size_override is None
            else None
        )
        self._prenormed = _Prenormed()
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
        if fused is not None:
            stream = hidden_states if residual is None else hidden_states + residual
        out: tuple[torch.Tensor, torch.Tensor] | None = None
        h, r = hidden_states, residual
        for p in range(schedule.max_loops):
            full = schedule.full_pass[p]
            rows = schedule.pass_rows[p]
            pass_positions = positions if full else positions.index_select(-1, rows)
            with self._bound(p, None if full else rows, schedule.num_tokens, fused is not None):
                for layer in self.layers:
                    h, r = layer(pass_positions, h, r, **kwargs)
            num_rows, num_next = rows.shape[0], schedule.num_next[p]
            if full and num_next == 0:
                return h, r  # every row stops here: the pair already is the coda's input
            if out is None:
                out = (torch.empty_like(h), torch.empty_like(r))
            if fused is not None:
                step = loop_step(
                    h,
                    r,
                    stream,
                    rows,
                    schedule.next_slot[p],
                    num_next,
                    fused.weight,
                    fused.variance_epsilon,
                    *out,
                )
                h = step.next_hidden
                r = stream = step.next_residual
                continue
            if num_next < num_rows:
                done, done_rows, keep = schedule.done[p], schedule.done_rows[p], schedule.keep[p]
                out[0].index_copy_(0, done_rows, h.index_select(0, done))
                out[1].index_copy_(0, done_rows, r.index_select(0, done))
                h, r = h.index_select(0, keep), r.index_select(0, keep)
        assert out is not None
        return out

    @contextmanager
    def _bound(
        self, p: int, rows: torch.Tensor | None, num_tokens: int, prenormed: bool
    ) -> Iterator[None]:
        """Pass p+1's attention planes (and pre-normed entry) in place, for one pass."""
        if p == 0:
            yield
            return
        entry = self.layers[0]
        saved_norm = entry.input_layernorm if prenormed else None
        for (parent, name, _), plane in zip(self.sites, self.planes[p - 1], strict=True):
            plane.rows, plane.num_tokens = rows, num_tokens
            setattr(parent, name, plane)
        if prenormed:
            entry.input_layernorm = self._prenormed
        try:
            yield
        finally:
            for parent, name, attention in self.sites:
                setattr(parent, name, attention)
            if saved_norm is not None:
                entry.input_layernorm = saved_norm
