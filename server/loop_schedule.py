"""Per-step loop schedule: which rows of a flattened batch run each pass of the block.

vLLM flattens every scheduled token of every request into one batch; each token carries
its request's loop count k. The schedule is computed once per step on the host (the
counts are known before the forward), so the model's pass loop only gathers rows and
the loop-step kernel only scatters them by precomputed slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LoopSchedule:
    """Rows per pass and the hand-over from each pass to the next.

    `pass_rows[p]` are the batch rows running pass p+1; `full_pass[p]` says they are all
    rows, in order, so the model skips gathers. `next_slot[p]`, one entry per row of pass
    p+1, is the row's position among the rows of pass p+2, or -1 where it has finished.
    """

    num_tokens: int
    max_loops: int
    pass_rows: list[torch.Tensor]
    full_pass: list[bool]
    next_slot: list[torch.Tensor]
    num_next: list[int]

    @classmethod
    def build(cls, token_loops: np.ndarray, device: torch.device | str) -> LoopSchedule:
        loops = np.asarray(token_loops, dtype=np.int64)
        n = int(loops.shape[0])
        max_loops = int(loops.max()) if n else 1
        if n and int(loops.min()) < 1:
            raise ValueError(f"every token needs a loop count >= 1, got {int(loops.min())}")
        rows = np.arange(n)
        pass_rows: list[torch.Tensor] = []
        full_pass: list[bool] = []
        next_slot: list[torch.Tensor] = []
        num_next: list[int] = []
        for pass_index in range(1, max_loops + 1):
            pass_rows.append(torch.from_numpy(rows).to(device, non_blocking=True))
            full_pass.append(len(rows) == n)
            continuing = loops[rows] > pass_index
            slot = np.where(continuing, np.cumsum(continuing) - 1, -1)
            next_slot.append(torch.from_numpy(slot).to(device, non_blocking=True))
            rows = rows[continuing]
            num_next.append(len(rows))
        return cls(n, max_loops, pass_rows, full_pass, next_slot, num_next)
