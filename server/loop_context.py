"""The one object a looped forward reads: this step's loop counts, schedule and pass.

vLLM hands a model only tensors; which request asked for how many passes is known to
the model runner. loopserve's runner hook publishes it once per step (`looping`), the
way nano-vllm's runner sets its attention `Context` before the forward; the looped
model builds the step's row schedule from it, the block advances `pass_index` as it
runs passes, and the pass attention reads the rows of the running pass. Nothing about
a step is written on a module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch

from loopserve.server.loop_schedule import LoopSchedule


class MissingLoopCounts(RuntimeError):
    """A batch reached the looped model without per-token loop counts (no hook ran)."""


@dataclass
class LoopContext:
    """One step of a looped model.

    `token_loops`: one count per batch row, or one int for every row (vLLM pads its
    dummy runs to a size only the forward sees). `schedule` is set by the model when
    the forward starts; `pass_index` (1-based) is the block pass now running.
    """

    token_loops: np.ndarray | int
    schedule: LoopSchedule | None = None
    pass_index: int = 1

    def start(self, num_tokens: int, device: torch.device) -> LoopSchedule:
        """The step's schedule for a batch of `num_tokens` rows, built once."""
        loops = self.token_loops
        if isinstance(loops, int):
            loops = np.full(num_tokens, loops)
        elif len(loops) != num_tokens:
            raise MissingLoopCounts(
                f"loop counts cover {len(loops)} tokens, the batch has {num_tokens}"
            )
        self.schedule = LoopSchedule.build(loops, device)
        return self.schedule


_current: ContextVar[LoopContext | None] = ContextVar("loopserve_loop_context", default=None)


@contextmanager
def looping(token_loops: np.ndarray | int) -> Iterator[LoopContext]:
    """Run the forwards inside with these per-token loop counts."""
    context = LoopContext(token_loops)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def active_loop_context() -> LoopContext | None:
    """The running step's context, if a hook published one (None between steps)."""
    return _current.get()


def current_loop_context() -> LoopContext:
    """The running step's context; refused when no runner hook published one."""
    context = _current.get()
    if context is None:
        raise MissingLoopCounts(
            "the looped model got a batch without per-token loop counts: "
            "loopserve's vLLM hooks are not active in this process"
        )
    return context
