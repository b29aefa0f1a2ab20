"""ASGI middleware in front of vLLM's OpenAI server: API key, body limit, `loops` in its place.

vLLM ignores unknown request fields, so a top-level `loops` would be dropped silently;
this middleware moves it into `vllm_xargs` (which vLLM hands to the model as
`SamplingParams.extra_args`) after checking it against the served loop plan, so a bad
value is a 400 before any work, streaming or not. It also keeps two things loopserve did
better than vLLM: an API key that guards every route that runs the model (vLLM's own
guards only some path prefixes) with an OpenAI-shaped 401, and a body limit (413).

The checked count is also published for the rest of the request in `REQUESTED_LOOPS`:
some of vLLM's paths build their own sampling parameters (beam search, generative
scoring), and the engine-client hook (`vllm_hooks`) carries the count on from there.

Runs as `--middleware loopserve.server.http_guard.LoopserveMiddleware` (`loopserve serve`
adds it); being the last middleware vLLM adds, it is the outermost. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from contextvars import ContextVar
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loopserve.server.loop_plan import LOOPS_KEY, LoopPlan, LoopPlanError

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# Routes that never reach the model answer without a key (orchestrators probe them).
OPEN_PATHS = frozenset(
    {"/health", "/ping", "/metrics", "/version", "/openapi.json", "/docs", "/redoc"}
)
XARGS_KEY = "vllm_xargs"
# The loop count the HTTP request being served asked for (None: it named none).
REQUESTED_LOOPS: ContextVar[int | None] = ContextVar("loopserve_requested_loops", default=None)


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    """vLLM's error shape: `{"error": {"message", "type", "param", "code"}}`."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def place_loops(body: dict[str, Any], plan: LoopPlan) -> int | None:
    """Check `loops` (top level and/or `vllm_xargs`) and leave it only in `vllm_xargs`.

    Returns the loop count, None where the body names none. Raises LoopPlanError (its
    `args[1]` names the field) for a value the plan refuses or for two places that disagree.
    """
    xargs = body.get(XARGS_KEY)
    if xargs is not None and not isinstance(xargs, dict):
        return None  # vLLM refuses the malformed `vllm_xargs` itself
    in_xargs = xargs is not None and LOOPS_KEY in xargs
    if LOOPS_KEY not in body and not in_xargs:
        return None
    values = {}
    for param, present, value in (
        (LOOPS_KEY, LOOPS_KEY in body, body.get(LOOPS_KEY)),
        (f"{XARGS_KEY}.{LOOPS_KEY}", in_xargs, in_xargs and xargs[LOOPS_KEY]),
    ):
        if present:
            try:
                values[param] = plan.check_loops(value)
            except LoopPlanError as error:
                raise LoopPlanError(str(error), param) from None
    if len(set(values.values())) > 1:
        raise LoopPlanError(f"'loops' and 'vllm_xargs.loops' disagree: {values}", LOOPS_KEY)
    loops = values.popitem()[1]
    body.pop(LOOPS_KEY, None)
    body[XARGS_KEY] = {**(xargs or {}), LOOPS_KEY: loops}
    return loops


class LoopserveMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._key_hashes: list[bytes] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if scope["method"] != "OPTIONS" and path not in OPEN_PATHS and not self._authorized(scope):
            response = error_response(401, "missing or invalid API key", "AuthenticationError")
            return await response(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)

        limit = getattr(server_args(state), "max_body_bytes", None) or DEFAULT_MAX_BODY_BYTES
        too_large = error_response(
            413, f"request body is larger than {limit} bytes", "RequestEntityTooLarge"
        )
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await too_large(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            if len(body) > limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break

        data, loops = bytes(body), None
        if b'"loops"' in data:  # cheap test first: most requests carry no `loops`
            try:
                data, loops = self._with_loops_placed(data, state)
            except LoopPlanError as error:
                param = error.args[1] if len(error.args) > 1 else LOOPS_KEY
                response = error_response(400, str(error.args[0]), "BadRequestError", param)
                return await response(scope, receive, send)
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(data)).encode())]}

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later reads wait for the client's disconnect
            replayed = True
            return {"type": "http.request", "body": data, "more_body": False}

        token = REQUESTED_LOOPS.set(loops)
        try:
            await self.app(scope, replay, send)
        finally:
            REQUESTED_LOOPS.reset(token)

    def _authorized(self, scope: Scope) -> bool:
        if self._key_hashes is None:
            keys = server_args(scope["app"].state).api_key or [os.environ.get("VLLM_API_KEY")]
            self._key_hashes = [hashlib.sha256(k.encode()).digest() for k in keys if k]
        if not self._key_hashes:
            return True
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        given_hash = hashlib.sha256(given.encode()).digest()
        match = False
        for key_hash in self._key_hashes:  # no early exit: constant time over the keys
            match |= secrets.compare_digest(given_hash, key_hash)
        return match and scheme.lower() == "bearer"

    @staticmethod
    def _with_loops_placed(data: bytes, state: Any) -> tuple[bytes, int | None]:
        try:
            body = json.loads(data)
        except ValueError:
            return data, None  # not JSON: vLLM answers that itself
        if not isinstance(body, dict):
            return data, None
        loops = place_loops(body, served_plan(state))
        return (data, None) if loops is None else (json.dumps(body).encode(), loops)


def served_plan(state: Any) -> LoopPlan:
    """The served model's loop plan, from the config vLLM built (hf_overrides included)."""
    from loopserve.server.engine import served_model_info
    from loopserve.server.vllm_http_hooks import served_model_config

    if not hasattr(state, "loop_model"):
        state.loop_model = served_model_info(served_model_config(state))
    return state.loop_model.plan


def server_args(state: Any) -> Any:
    """vLLM's parsed `serve` arguments, through the API-server hooks (imported late: they
    import this module)."""
    from loopserve.server import vllm_http_hooks

    return vllm_http_hooks.server_args(state)
