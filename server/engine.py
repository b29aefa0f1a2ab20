"""vLLM engine arguments for the looped model, and the facts of the model being served.

`vllm_engine_kwargs` turns loopserve's configuration into vLLM's own engine arguments
(the looped architecture and its plan travel in `hf_overrides`); `served_model_info`
reads the plan and shape back from the config vLLM built, so the HTTP side prices and
checks exactly what the engine runs. Per-request loops travel in
`SamplingParams.extra_args["loops"]` (vLLM's `vllm_xargs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopserve.server.flops import FlopsModel, ModelShape
from loopserve.server.loop_plan import (
    PLAN_CONFIG_KEY,
    LoopPlan,
    LoopPlanError,
    looped_architecture,
    plan_from_hf_config,
)


@dataclass
class EngineConfig:
    """What `loopserve serve` and the tests configure; None means the model's default
    (for the loop options: the checkpoint's own `loop_plan`, else the middle 4 layers,
    K = 4, default 1)."""

    model: str | None = None
    served_model_name: str | None = None
    loop_block: tuple[int, int] | None = None
    max_loops: int | None = None
    default_loops: int | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    max_num_batched_tokens: int | None = None

    def model_path(self) -> str:
        from loopserve.server.default_model import resolve_model

        return resolve_model(self.model)


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
    """The checkpoint's plan (its config.json `loop_plan`, else the default one), with
    each loop option the caller set replacing that part of it."""
    checkpoint_architecture(hf_config)
    base = plan_from_hf_config(hf_config)
    start, end = config.loop_block or (base.start, base.end)
    return LoopPlan(
        hf_config["num_hidden_layers"],
        start,
        end,
        base.max_loops if config.max_loops is None else config.max_loops,
        base.default_loops if config.default_loops is None else config.default_loops,
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
    }
    if config.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
    return kwargs, info


def served_model_info(model_config: Any) -> ModelInfo:
    """ModelInfo of the model a running vLLM serves (its `ModelConfig`, overrides applied)."""
    hf_config = model_config.hf_config.to_dict()
    plan = plan_from_hf_config(hf_config)
    return ModelInfo(
        name=model_config.served_model_name,
        path=model_config.model,
        plan=plan,
        shape=ModelShape.from_hf_config(hf_config),
    )
