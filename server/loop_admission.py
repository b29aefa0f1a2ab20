"""Admission check of loop counts, through vLLM's logits-processor extension point.

vLLM calls a logits processor's `validate_params` when it admits a request (before the
request is scheduled), whatever the path: offline `LLM.generate`, vLLM's own OpenAI
server, loopserve's. A ValueError there fails that request alone with its message; the
same bad value reaching the model runner would stop the engine for every request.

`validate_params` sees only the request's parameters, not the engine, so each loop plan
gets its own validator class, named after the plan (`validator_for`): an importable
name that vLLM can load in any process, and no global state shared between engines.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from loopserve.server.loop_plan import LoopPlan

_PREFIX = "LoopCounts_"


class LoopCountValidator(LogitsProcessor):
    """Checks `extra_args["loops"]` against `plan`; changes no logits."""

    plan: LoopPlan

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        cls.plan.loops_of(sampling_params.extra_args)

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def validator_for(plan: LoopPlan) -> str:
    """Fully qualified name of the validator class for `plan`, as vLLM's config takes it."""
    fields = (plan.num_layers, plan.start, plan.end, plan.max_loops, plan.default_loops)
    return f"{__name__}:{_PREFIX}{'_'.join(map(str, fields))}"


@functools.cache
def _validator_class(name: str) -> type[LoopCountValidator]:
    num_layers, start, end, max_loops, default_loops = map(int, name[len(_PREFIX) :].split("_"))
    plan = LoopPlan(num_layers, start, end, max_loops, default_loops)
    return type(name, (LoopCountValidator,), {"plan": plan, "__module__": __name__})


def __getattr__(name: str) -> type[LoopCountValidator]:
    if name.startswith(_PREFIX):
        return _validator_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
