"""In-process engine: vLLM's AsyncLLM on the looped model, with loops per request.

The HTTP layer talks to this module only: it hands over validated sampling arguments
and a loop count, and gets vLLM's `RequestOutput`s back as deltas. Everything that
turns "loops=k" into vLLM state happens here (SamplingParams.extra_args, validated
against the one LoopPlan) or in vllm_hooks (per-token counts, cache salt).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopserve.server.flops import FlopsModel, ModelShape
from loopserve.server.loop_plan import (
    LOOPS_KEY,
    PLAN_CONFIG_KEY,
    LoopPlan,
    LoopPlanError,
    looped_architecture,
)


@dataclass
class EngineConfig:
    """What `loopserve serve` and the tests configure; None means the model's default."""

    model: str | None = None
    served_model_name: str | None = None
    loop_block: tuple[int, int] | None = None
    max_loops: int = 4
    default_loops: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    seed: int = 0
    extra_engine_args: dict[str, Any] = field(default_factory=dict)

    def model_path(self) -> str:
        if self.model is not None:
            return self.model
        from loopserve.server.default_model import default_model_path

        return str(default_model_path())


def read_hf_config(model: str) -> dict[str, Any]:
    """The checkpoint's config.json (local directory), or transformers' view of a hub id."""
    path = Path(model) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).to_dict()


def checkpoint_architecture(hf_config: dict[str, Any]) -> str:
    """The checkpoint's vLLM architecture; refused unless loopserve can loop it."""
    architectures = hf_config.get("architectures") or []
    if len(architectures) != 1:
        raise LoopPlanError(f"expected one architecture in config.json, got {architectures}")
    looped_architecture(architectures[0])  # raises, listing the supported ones
    return architectures[0]


def build_plan(config: EngineConfig, hf_config: dict[str, Any]) -> LoopPlan:
    checkpoint_architecture(hf_config)
    return LoopPlan.for_model(
        hf_config["num_hidden_layers"], config.loop_block, config.max_loops, config.default_loops
    )


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the served model: what /v1/models shows and what FLOPs are priced on."""

    name: str
    path: str
    plan: LoopPlan
    shape: ModelShape

    @property
    def flops(self) -> FlopsModel:
        return FlopsModel(self.shape, self.plan)


def vllm_engine_kwargs(config: EngineConfig) -> tuple[dict[str, Any], ModelInfo]:
    """Keyword arguments for vLLM's `LLM` / `AsyncEngineArgs` that load the looped model."""
    from loopserve.server import vllm_hooks

    vllm_hooks.register()  # this process too, also when loaded before vLLM's plugin pass
    model = config.model_path()
    hf_config = read_hf_config(model)
    plan = build_plan(config, hf_config)
    info = ModelInfo(
        name=config.served_model_name or Path(model).name,
        path=model,
        plan=plan,
        shape=ModelShape.from_hf_config(hf_config),
    )
    kwargs: dict[str, Any] = {
        "model": model,
        "served_model_name": info.name,
        "hf_overrides": {
            "architectures": [looped_architecture(checkpoint_architecture(hf_config))],
            PLAN_CONFIG_KEY: plan.to_dict(),
        },
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "enable_prefix_caching": config.enable_prefix_caching,
        "enforce_eager": config.enforce_eager,
        "seed": config.seed,
        **config.extra_engine_args,
    }
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(config, name) is not None:
            kwargs[name] = getattr(config, name)
    return kwargs, info


class LoopEngine:
    """vLLM AsyncLLM serving the looped model. Create with `LoopEngine.start(config)`."""

    def __init__(self, llm: Any, info: ModelInfo) -> None:
        self._llm = llm
        self.info = info

    @classmethod
    def start(cls, config: EngineConfig) -> LoopEngine:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs, info = vllm_engine_kwargs(config)
        kwargs.setdefault("disable_log_stats", True)
        return cls(AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs)), info)

    @property
    def plan(self) -> LoopPlan:
        return self.info.plan

    @property
    def max_model_len(self) -> int:
        return self._llm.vllm_config.model_config.max_model_len

    @property
    def tokenizer(self) -> Any:
        return self._llm.get_tokenizer()

    @property
    def is_running(self) -> bool:
        return not self._llm.errored

    def sampling_params(self, sampling: dict[str, Any], loops: int | None = None) -> Any:
        """vLLM SamplingParams (streaming deltas) carrying the loop count in `extra_args`.

        Raises ValueError (LoopPlanError for `loops`) for anything vLLM would refuse, so
        callers can answer a client error before any work starts.
        """
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        loops = self.plan.default_loops if loops is None else self.plan.check_loops(loops)
        sampling = {"output_kind": RequestOutputKind.DELTA, **sampling}
        extra = dict(sampling.pop("extra_args", None) or {})
        extra[LOOPS_KEY] = loops
        try:
            return SamplingParams(**sampling, extra_args=extra)
        except VLLMClientError as error:
            raise ValueError(str(error)) from error

    async def generate(
        self, prompt: str | list[int], params: Any, request_id: str | None = None
    ) -> AsyncIterator[Any]:
        """Stream `RequestOutput`s for params from `sampling_params`.

        Closing the iterator early (client gone) aborts the request in vLLM.
        """
        engine_prompt: dict[str, Any] = (
            {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        )
        stream = self._llm.generate(engine_prompt, params, request_id or uuid.uuid4().hex)
        async with aclosing(stream):  # closing it aborts the request inside vLLM
            async for output in stream:
                yield output

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def shutdown(self) -> None:
        self._llm.shutdown()
