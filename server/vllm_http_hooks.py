"""The API-server half of loopserve's vLLM hooks: what `loopserve serve` reads and wraps.

Only the API server process runs this module (the engine half is `vllm_hooks`). vLLM's
OpenAI serving classes build `usage` from token totals inside their response methods,
with no extension point; exact FLOPs need each sequence's length, so loopserve wraps,
per serving instance, the four methods that see every `RequestOutput` of a request and
adds the loop fields to the usage they return. The engine client's public `generate`
is wrapped on the instance to carry the request's loops onto parameters vLLM builds
itself, and for loopserve's metrics. `loopserve serve` is vLLM's own `serve` command
(its parser and subcommand); the middleware and endpoint plugin read vLLM's app state
(`args`, `vllm_config`, `openai_serving_models`).

Every name used here is checked at import against the vLLM release it was written for.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import inspect
import json
from typing import Any

import vllm
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
from vllm.logger import configure_logging_from_args
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.utils.argparse_utils import FlexibleArgumentParser

from loopserve.server.http_guard import REQUESTED_LOOPS
from loopserve.server.loop_plan import LOOPS_KEY, LoopPlan
from loopserve.server.loop_usage import SequenceTally
from loopserve.server.metrics import loop_metrics

_HOOKED = (
    ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion", (
        "request_output_to_completion_response", "completion_stream_generator")),
    ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat", (
        "chat_completion_full_generator", "chat_completion_stream_generator")),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels", (
        "show_available_models",)),
    ("vllm.entrypoints.cli.serve", "ServeSubcommand", ("validate", "cmd")),
)  # fmt: skip
# What the middleware and the endpoint plugin read from vLLM's FastAPI app state.
APP_STATE = ("args", "vllm_config", "openai_serving_models")

for _module, _owner, _names in _HOOKED:
    _cls = getattr(importlib.import_module(_module), _owner, None)
    for _name in _names:
        if _cls is None or not hasattr(_cls, _name):
            raise ImportError(
                f"vLLM {vllm.__version__} has no {_owner}.{_name}: loopserve's API-server "
                "hooks do not fit this release"
            )


def vllm_serve_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """vLLM's own `serve` parser (every `vllm serve` option), after vLLM's CLI set-up."""
    cli_env_setup()
    return make_arg_parser(FlexibleArgumentParser(prog=prog, description=description))


def run_vllm_serve(args: argparse.Namespace) -> None:
    """Run vLLM's own `serve` command with these arguments, until it exits."""
    configure_logging_from_args(args)
    serve = ServeSubcommand()
    serve.validate(args)
    serve.cmd(args)


def check_app_state(state: Any) -> None:
    """Refuse to serve if vLLM's app state lacks what loopserve reads (at start-up)."""
    missing = [name for name in APP_STATE if not hasattr(state, name)]
    if missing:
        raise RuntimeError(
            f"vLLM {vllm.__version__}'s API server state has no {', '.join(missing)}: "
            "loopserve's API-server hooks do not fit this release"
        )


def server_args(state: Any) -> argparse.Namespace:
    """The parsed `serve` arguments (loopserve's own options included)."""
    return state.args


def served_model_config(state: Any) -> Any:
    """The `ModelConfig` the engine was built from (hf_overrides applied)."""
    return state.vllm_config.model_config


async def available_models(state: Any) -> dict[str, Any]:
    """vLLM's /v1/models listing, as a dict."""
    return (await state.openai_serving_models.show_available_models()).model_dump()


def _request_loops(request: Any, plan: LoopPlan) -> int:
    return plan.loops_of(getattr(request, "vllm_xargs", None))


def _add_usage(usage: Any, fields: dict[str, int]) -> None:
    for name, value in fields.items():
        setattr(usage, name, value)  # vLLM's UsageInfo allows extra fields


async def _tallied(results: Any, tally: Any, done: list[bool]) -> Any:
    """Pass a serving method's RequestOutputs (or (prompt index, output)) through, counted."""
    async for item in results:
        index, output = item if isinstance(item, tuple) else (0, item)
        tally.observe(index, output)
        yield item
    done.append(True)


def _wrap_stream(original, info: Any):
    """A `*_stream_generator`: count its input, add loop fields to the final usage chunk."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    async def stream(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        tally, done = SequenceTally(), []
        loops = _request_loops(bound.arguments["request"], info.plan)
        bound.arguments["result_generator"] = _tallied(
            bound.arguments["result_generator"], tally, done
        )
        async for chunk in original(*bound.args, **bound.kwargs):
            if done and '"usage":{' in chunk and chunk.startswith("data: {"):
                event = json.loads(chunk[len("data: ") :])
                if event.get("usage"):
                    event["usage"].update(tally.usage_fields(info.flops, loops))
                    chunk = f"data: {json.dumps(event)}\n\n"
            yield chunk

    return stream


def _wrap_chat_full(original, info: Any):
    signature = inspect.signature(original)

    @functools.wraps(original)
    async def full(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        tally = SequenceTally()
        loops = _request_loops(bound.arguments["request"], info.plan)
        bound.arguments["result_generator"] = _tallied(
            bound.arguments["result_generator"], tally, []
        )
        response = await original(*bound.args, **bound.kwargs)
        if getattr(response, "usage", None) is not None:
            _add_usage(response.usage, tally.usage_fields(info.flops, loops))
        return response

    return full


def _wrap_completion_response(original, info: Any):
    @functools.wraps(original)
    def response(final_res_batch, request, *args, **kwargs):
        result = original(final_res_batch, request, *args, **kwargs)
        tally = SequenceTally()
        for index, output in enumerate(final_res_batch):
            tally.observe(index, output)
        _add_usage(result.usage, tally.usage_fields(info.flops, _request_loops(request, info.plan)))
        return result

    return response


def _with_requested_loops(sampling_params: Any) -> Any:
    """The parameters, carrying the loop count the HTTP request asked for.

    Where vLLM builds sampling parameters itself (beam search's per-step requests,
    generative scoring, ...), the request's `vllm_xargs` never reach them; the count
    the middleware checked (`REQUESTED_LOOPS`) is added to a copy, so every path runs
    at the depth the request asked for.
    """
    requested = REQUESTED_LOOPS.get()
    if requested is None or not isinstance(sampling_params, SamplingParams):
        return sampling_params
    extra = sampling_params.extra_args or {}
    if LOOPS_KEY in extra:
        return sampling_params
    carried = copy.copy(sampling_params)
    carried.extra_args = {**extra, LOOPS_KEY: requested}
    return carried


def _wrap_generate(original, info: Any):
    metrics = loop_metrics()

    @functools.wraps(original)
    def generate(prompt, sampling_params, request_id, *args, **kwargs):
        sampling_params = _with_requested_loops(sampling_params)
        stream = original(prompt, sampling_params, request_id, *args, **kwargs)
        try:
            loops = info.plan.loops_of(getattr(sampling_params, "extra_args", None))
        except ValueError:
            return stream  # the engine's own admission check answers this request
        cumulative = getattr(sampling_params, "output_kind", None) == RequestOutputKind.CUMULATIVE
        return metrics.track(stream, loops, info.flops, cumulative)

    return generate


def install_http_hooks(state: Any, engine_client: Any, info: Any) -> None:
    """Loop fields in usage and loopserve metrics, on this API server's own objects."""
    engine_client.generate = _wrap_generate(engine_client.generate, info)
    wrappers = {
        "openai_serving_completion": {
            "request_output_to_completion_response": _wrap_completion_response,
            "completion_stream_generator": _wrap_stream,
        },
        "openai_serving_chat": {
            "chat_completion_full_generator": _wrap_chat_full,
            "chat_completion_stream_generator": _wrap_stream,
        },
    }
    for attribute, methods in wrappers.items():
        serving = getattr(state, attribute, None)
        for name, wrap in methods.items() if serving is not None else ():
            setattr(serving, name, wrap(getattr(serving, name), info))
