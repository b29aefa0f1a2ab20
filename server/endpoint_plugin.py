"""loopserve's vLLM endpoint plugin: loop facts in /v1/models, loop fields in usage, metrics.

Loaded by vLLM's API server when `VLLM_PLUGINS` names `loopserve` (`loopserve serve`
sets it). `init_state` runs once vLLM has built its serving objects; it reads the loop
plan from the config vLLM built and installs the usage and metrics hooks
(`vllm_http_hooks.install_http_hooks`) on this server's own objects.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from loopserve.server.engine import served_model_info

router = APIRouter()


@router.get("/v1/models")
async def models_with_loop_plan(raw_request: Request) -> JSONResponse:
    """vLLM's model list; the base model's card also says how it loops."""
    from loopserve.server.vllm_http_hooks import available_models

    state = raw_request.app.state
    listing = await available_models(state)
    plan = state.loop_model.plan
    for card in listing["data"]:
        if card.get("parent") is None:  # LoRA adapters name their base model here
            card.update(
                num_layers=plan.num_layers,
                loop_block=[plan.start, plan.end],
                max_loops=plan.max_loops,
                default_loops=plan.default_loops,
            )
    return JSONResponse(listing)


class LoopserveEndpointPlugin:
    name = "loopserve"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        from loopserve.server.vllm_http_hooks import check_app_state, install_http_hooks

        check_app_state(state)
        state.loop_model = served_model_info(engine_client.model_config)
        install_http_hooks(state, engine_client, state.loop_model)
