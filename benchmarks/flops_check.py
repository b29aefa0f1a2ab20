"""Forward FLOPs counted by torch on the unrolled model, independently of the FLOPs model.

The harness plots accuracy against FLOPs and the server bills `usage.total_flops` from
`loopserve.server.flops`, so both are checked against a count that shares no code with
it: the checkpoint's transformers model, unrolled to its executed layers, is built on
meta tensors (no weights are read, so a 7B checkpoint costs what a tiny one does) and
torch's `FlopCounterMode` counts every matmul of one forward. Eager attention makes the
attention matmuls visible; they cover the full S x S score square, of which a layer
attends only to the entries its mask keeps (causal, and within the window of a sliding
layer, as the transformers model applies it), so each layer's attention count is scaled
to the entries it keeps, counted one by one. The tests and the benchmarks' probe both
call `counted_flops`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from loopserve.server.loop_plan import LoopPlan

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig


def checkpoint_config(model_path: str) -> PretrainedConfig:
    """The checkpoint's transformers config (config.json only; no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path)


def counted_flops(config: PretrainedConfig, plan: LoopPlan, loops: int, tokens: int) -> int:
    """Forward FLOPs of one sequence of `tokens` tokens at `loops`, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = _unrolled_on_meta(config, plan.executed_layers(plan.check_loops(loops)))
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    # An explicit mask keeps transformers from inspecting position ids (meta has no values).
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    counts = {
        module: {str(op): flops for op, flops in ops.items()}
        for module, ops in counter.get_flop_counts().items()
    }
    dense = counts["Global"].pop("aten.mm", 0) + counts["Global"].pop("aten.addmm", 0)
    unexpected = set(counts["Global"]) - {"aten.bmm"}
    if unexpected:
        raise RuntimeError(f"unexpected matmul ops in the reference forward: {sorted(unexpected)}")
    attention = 0
    for index, layer in enumerate(model.model.layers):
        square = counts[f"{type(model).__name__}.model.layers.{index}.self_attn"]["aten.bmm"]
        window = _window(layer) or tokens
        kept = sum(min(t + 1, window) for t in range(tokens))
        if square * kept % tokens**2:
            raise RuntimeError(f"layer {index}: attention FLOPs do not split into score entries")
        attention += square * kept // tokens**2
    return dense + attention


def _unrolled_on_meta(config: PretrainedConfig, order: list[int]) -> nn.Module:
    """The model whose layer i is checkpoint layer order[i], with eager attention, on meta."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = len(order)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in order]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _window(layer: nn.Module) -> int | None:
    """The layer's sliding window as transformers applies it: the attention's own (Gemma,
    Qwen), else the config's for every layer (Mistral)."""
    attention = layer.self_attn
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(attention.config, "sliding_window", None)
