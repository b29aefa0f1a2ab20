"""Per-step loop schedule: which rows of a flattened batch run each pass of the block.

vLLM flattens every scheduled token of every request into one batch; each token carries
its request's loop count k. The schedule is computed once per step on the host (the
counts are known before the forward), so the pass loop only gathers rows by precomputed
indices. A step whose tokens all run k=1 needs no tensors at all: `build` returns a
schedule without them, and the model runs the block once (`LoopedCausalLM.forward` says
through which graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class LoopSchedule:
    """Rows per pass and the hand-over from each pass to the next (p indexes pass p+1).

    `pass_rows[p]`: batch rows running pass p+1; `full_pass[p]`: they are all rows, in
    order. Among those rows, `keep[p]` index the ones that run pass p+2 (in order) and
    `done[p]` the ones that stop after pass p+1, whose batch rows are `done_rows[p]`.
    `next_slot[p]` (one entry per row of pass p+1: its position among the rows of pass
    p+2, or -1) and `num_next[p]` are the same hand-over in the loop-step kernel's terms.
    """

    max_loops: int
    pass_rows: list[torch.Tensor] = field(default_factory=list)
    full_pass: list[bool] = field(default_factory=list)
    keep: list[torch.Tensor] = field(default_factory=list)
    done: list[torch.Tensor] = field(default_factory=list)
    done_rows: list[torch.Tensor] = field(default_factory=list)
    next_slot: list[torch.Tensor] = field(default_factory=list)
    num_next: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, token_loops: np.ndarray, device: torch.device | str) -> LoopSchedule:
        loops = np.asarray(token_loops, dtype=np.int64)
        n = int(loops.shape[0])
        if n and int(loops.min()) < 1:
            raise ValueError(f"every token needs a loop count >= 1, got {int(loops.min())}")
        max_loops = int(loops.max()) if n else 1
        schedule = cls(max_loops)
        if max_loops == 1:
            return schedule

        def to_device(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device, non_blocking=True)

        rows = np.arange(n)
        for pass_index in range(1, max_loops + 1):
            continuing = loops[rows] > pass_index
            schedule.pass_rows.append(to_device(rows))
            schedule.full_pass.append(len(rows) == n)
            schedule.keep.append(to_device(np.flatnonzero(continuing)))
            schedule.done.append(to_device(np.flatnonzero(~continuing)))
            schedule.done_rows.append(to_device(rows[~continuing]))
            schedule.next_slot.append(
                to_device(np.where(continuing, np.cumsum(continuing) - 1, -1))
            )
            rows = rows[continuing]
            schedule.num_next.append(len(rows))
        return schedule
