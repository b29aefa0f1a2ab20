"""FLOPs counted on the unrolled reference, independently of the FLOPs model.

The harness plots accuracy against FLOPs, so the server's billed `usage.total_flops` is
checked against a count that shares no code with `loopserve.server.flops`: torch's
`FlopCounterMode` counts every matmul the unrolled transformers model executes for the same
number of tokens (FLOPs do not depend on token ids). Eager attention makes the attention
matmuls visible to the counter; they cover the full square score matrix, of which a causal
model uses the lower triangle (S(S + 1) / 2 of S^2 entries), so that share is kept.
"""

from __future__ import annotations

from loopserve.server.loop_plan import LoopPlan


def counted_request_flops(model_path: str, plan: LoopPlan, loops: int, tokens: int) -> int:
    """Forward FLOPs of one sequence of `tokens` tokens at `loops`, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from loopserve.server.reference import UnrolledReference

    reference = UnrolledReference(model_path, plan)
    reference.model.set_attn_implementation("eager")
    ids = torch.zeros(1, tokens, dtype=torch.long)
    with (
        reference.unrolled(loops) as model,
        torch.inference_mode(),
        FlopCounterMode(display=False) as counter,
    ):
        model(input_ids=ids, use_cache=False)
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    dense = counts.pop("aten.mm")
    attention = counts.pop("aten.bmm")  # q @ k^T and p @ v over all S x S pairs
    if counts:
        raise RuntimeError(f"unexpected matmul ops in the reference forward: {sorted(counts)}")
    causal, square = tokens * (tokens + 1) // 2, tokens * tokens
    if attention * causal % square:
        raise RuntimeError("attention FLOPs are not a whole multiple of the causal share")
    return dense + attention * causal // square
