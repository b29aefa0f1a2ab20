"""Llama-family model for vLLM whose middle block runs k times per token, k per request.

Layers `[0, start)` (prelude) and `[end, L)` (coda) run once; the block `[start, end)`
runs `k` times with shared weights. Exactness with the unrolled model needs one KV plane
per executed (layer, pass): pass p >= 2 of block layer i gets its own vLLM `Attention`
under the virtual layer index `(p - 1) * L + i`, so vLLM allocates and binds a cache for
it like for any other layer (vLLM's `iquest_loopcoder.py` does the same for fixed k).

Rows whose request has finished its passes skip the block's dense work: each pass
gathers its rows, runs the projections and MLP on them alone, and attention sees the full
batch (its metadata stays valid; a frozen row's K/V land in a plane its request never
reads). The hand-over between passes goes through `loopserve.kernels.loop_step`.

The pass loop depends on the batch, so this model is never traced by torch.compile or
captured in a CUDA graph (vllm_hooks turns both off for it, with a log line).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import (
    make_empty_intermediate_tensors_factory,
    make_layers,
)
from vllm.sequence import IntermediateTensors

from loopserve.kernels.loop_step import loop_step
from loopserve.server.loop_plan import PLAN_CONFIG_KEY, LoopPlan
from loopserve.server.loop_schedule import LoopSchedule


class MissingLoopCounts(RuntimeError):
    """A batch reached the model without per-token loop counts (a vLLM hook did not run)."""


def loop_plan_from_config(hf_config) -> LoopPlan:
    """The plan carried in the HF config (set through `hf_overrides`), else the default."""
    data = getattr(hf_config, PLAN_CONFIG_KEY, None)
    if data is None:
        return LoopPlan.for_model(hf_config.num_hidden_layers)
    return LoopPlan.from_dict(dict(data))


class LoopedLlamaModel(nn.Module):
    """vLLM's `LlamaModel` with the pass loop; same submodule names, so weights load as-is."""

    hf_to_vllm_mapper = LlamaModel.hf_to_vllm_mapper
    load_weights = LlamaModel.load_weights

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.plan = loop_plan_from_config(config)
        self.vocab_size = config.vocab_size
        self.embed_tokens = VocabParallelEmbedding(
            self.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config
        )
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )
        self.pass_attn = nn.ModuleList(
            nn.ModuleList(
                self._pass_attention(vllm_config, prefix, pass_index, layer_index)
                for layer_index in range(self.plan.start, self.plan.end)
            )
            for pass_index in range(2, self.plan.max_loops + 1)
        )
        self._schedule: LoopSchedule | None = None

    def _pass_attention(
        self, vllm_config: VllmConfig, prefix: str, pass_index: int, layer_index: int
    ) -> Attention:
        """A fresh Attention (own KV plane) for pass `pass_index` of block layer `layer_index`.

        It copies the base layer's attention settings, sliding window included, so a pass
        attends exactly as the layer's first pass does.
        """
        base = self.layers[layer_index].self_attn
        virtual_index = (pass_index - 1) * self.plan.num_layers + layer_index
        return Attention(
            base.num_heads,
            base.head_dim,
            base.scaling,
            num_kv_heads=base.num_kv_heads,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            per_layer_sliding_window=base.attn.sliding_window,
            prefix=f"{prefix}.layers.{virtual_index}.self_attn.attn",
        )

    @contextmanager
    def looping(self, token_loops: np.ndarray) -> Iterator[LoopSchedule]:
        """Run the forwards inside this block with these per-token loop counts."""
        self._schedule = LoopSchedule.build(token_loops, self.embed_tokens.weight.device)
        try:
            yield self._schedule
        finally:
            self._schedule = None

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        schedule = self._schedule
        if schedule is None:
            raise MissingLoopCounts(
                "the looped model got a batch without per-token loop counts: "
                "loopserve's vLLM hooks are not active in this process"
            )
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        if hidden.shape[0] != schedule.num_tokens:
            raise MissingLoopCounts(
                f"loop counts cover {schedule.num_tokens} tokens, the batch has {hidden.shape[0]}"
            )
        plan = self.plan
        residual = None
        for layer in self.layers[: plan.start]:
            hidden, residual = layer(positions, hidden, residual)
        if schedule.max_loops == 1:
            for layer in self.layers[plan.start : plan.end]:
                hidden, residual = layer(positions, hidden, residual)
        else:
            hidden, residual = self._loop_block(positions, hidden, residual, schedule)
        for layer in self.layers[plan.end :]:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def _loop_block(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        schedule: LoopSchedule,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Passes 1..max_k of the block; returns the coda's input pair for every row."""
        block = self.layers[self.plan.start : self.plan.end]
        entry_norm = block[0].input_layernorm
        if residual is None:
            stream, normed = hidden, entry_norm(hidden)
        else:
            normed, stream = entry_norm(hidden, residual)
        num_tokens = hidden.shape[0]
        out_hidden = torch.empty_like(hidden)
        out_residual = torch.empty_like(hidden)
        for pass_index in range(1, schedule.max_loops + 1):
            p = pass_index - 1
            rows, full = schedule.pass_rows[p], schedule.full_pass[p]
            pass_positions = positions if full else positions.index_select(-1, rows)
            h, r = normed, stream
            for i, layer in enumerate(block):
                if i > 0:
                    h, r = layer.input_layernorm(h, r)
                attn = layer.self_attn.attn if p == 0 else self.pass_attn[p - 1][i]
                h = _attention(layer, attn, pass_positions, h, None if full else rows, num_tokens)
                h, r = layer.post_attention_layernorm(h, r)
                h = layer.mlp(h)
            if full and schedule.num_next[p] == 0:
                return h, r  # every row stops here: the pair already is the coda's input
            step = loop_step(
                h,
                r,
                stream,
                rows,
                schedule.next_slot[p],
                schedule.num_next[p],
                entry_norm.weight,
                entry_norm.variance_epsilon,
                out_hidden,
                out_residual,
            )
            normed, stream = step.next_hidden, step.next_residual
        return out_hidden, out_residual


def _attention(
    layer: LlamaDecoderLayer,
    attn: Attention,
    positions: torch.Tensor,
    normed: torch.Tensor,
    rows: torch.Tensor | None,
    num_tokens: int,
) -> torch.Tensor:
    """`LlamaAttention.forward` on the given rows (None: all), attention over the full batch."""
    sa = layer.self_attn
    qkv, _ = sa.qkv_proj(normed)
    q, k, v = qkv.split([sa.q_size, sa.kv_size, sa.kv_size], dim=-1)
    q, k = sa.rotary_emb(positions, q, k)
    if rows is None:
        out = attn(q, k, v)
    else:
        q, k, v = (_scatter_rows(t, rows, num_tokens) for t in (q, k, v))
        out = attn(q, k, v).index_select(0, rows)
    out, _ = sa.o_proj(out)
    return out


def _scatter_rows(t: torch.Tensor, rows: torch.Tensor, num_tokens: int) -> torch.Tensor:
    full = t.new_zeros(num_tokens, t.shape[-1])
    return full.index_copy_(0, rows, t)


class LoopedLlamaForCausalLM(LlamaForCausalLM):
    """Entry point vLLM instantiates for architecture `LoopedLlamaForCausalLM`."""

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type=None):
        return LoopedLlamaModel(vllm_config=vllm_config, prefix=prefix)

    @property
    def loop_plan(self) -> LoopPlan:
        return self.model.plan

    def looping(self, token_loops: np.ndarray):
        return self.model.looping(token_loops)
