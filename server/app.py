"""FastAPI app: OpenAI-compatible routes, errors, auth, body limit, health and metrics.

The engine starts in a background thread so the port answers at once: /health says 503
until the model is loaded, and generation routes do the same. Every error leaves as the
OpenAI shape `{"error": {"message", "type", "param", "code"}}`, never a stack trace.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loopserve.server.engine import LoopEngine
from loopserve.server.metrics import Metrics
from loopserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from loopserve.server.serving import ClientError, Serving

logger = logging.getLogger("loopserve")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
OPEN_PATHS = ("/health", "/metrics", "/openapi.json", "/docs", "/redoc")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise APIError(413, self._message(), "invalid_request_error")
            return message

        try:
            await self.app(scope, limited, send)
        except APIError:
            await self._reject(scope, receive, send)

    def _message(self) -> str:
        return f"request body is larger than {self.max_bytes} bytes"

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, self._message(), "invalid_request_error")(scope, receive, send)


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class EngineHolder:
    """The engine once it has started; its start-up error if it failed."""

    def __init__(self) -> None:
        self.engine: LoopEngine | None = None
        self.serving: Serving | None = None
        self.error: BaseException | None = None

    def start(self, factory: Callable[[], LoopEngine], metrics: Metrics) -> None:
        try:
            engine = factory()
            self.serving = Serving(engine, metrics)
            self.engine = engine
            logger.info("loopserve: engine ready, serving %s", engine.info.name)
        except BaseException as error:  # reported by /health; the process stays up
            logger.exception("loopserve: engine failed to start")
            self.error = error

    def ready(self) -> Serving:
        if self.serving is None or self.engine is None or not self.engine.is_running:
            why = "failed to start" if self.error else "is starting"
            if self.engine is not None and not self.engine.is_running:
                why = "has stopped"
            raise APIError(503, f"the engine {why}; retry later", "service_unavailable")
        return self.serving


def create_app(engine_factory: Callable[[], LoopEngine], settings: ServerSettings) -> FastAPI:
    metrics = Metrics()
    holder = EngineHolder()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(
            target=holder.start, args=(engine_factory, metrics), daemon=True, name="engine-start"
        )
        thread.start()
        yield
        await asyncio.to_thread(thread.join)
        if holder.engine is not None:
            holder.engine.shutdown()

    app = FastAPI(title="loopserve", version="0.1.0", lifespan=lifespan)
    app.state.holder = holder
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Callable) -> Response:
        if settings.api_key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {settings.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return error_response(401, "missing or invalid API key", "authentication_error")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.type, error.param)

    @app.exception_handler(ClientError)
    async def on_client_error(_: Request, error: ClientError) -> JSONResponse:
        return error_response(400, str(error), "invalid_request_error", error.param)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        if first.get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON", "invalid_request_error")
        if first.get("type") == "extra_forbidden":
            message = f"unsupported parameter: {param}"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("loopserve: request failed")
        return error_response(500, f"internal error: {type(error).__name__}", "server_error")

    def check_model(serving: Serving, name: str | None) -> None:
        if name is not None and name != serving.engine.info.name:
            raise APIError(404, f"model {name!r} does not exist", "not_found_error", "model")

    async def respond(result: Any) -> Any:
        if isinstance(result, (CompletionResponse, ChatCompletionResponse)):
            return result
        return StreamingResponse(result, media_type="text/event-stream")

    error_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 500, 503)
    }

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses=error_responses,
        summary="Text completion; `loops` sets how often the loop block runs per token",
    )
    async def completions(body: CompletionRequest) -> Any:
        serving = holder.ready()
        check_model(serving, body.model)
        return await respond(await serving.completions(body))

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=error_responses,
        summary="Chat completion; `loops` sets how often the loop block runs per token",
    )
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        serving = holder.ready()
        check_model(serving, body.model)
        return await respond(await serving.chat(body))

    @app.get("/v1/models", response_model=ModelList, responses=error_responses)
    async def models() -> ModelList:
        engine = holder.ready().engine
        plan = engine.plan
        return ModelList(
            data=[
                ModelCard(
                    id=engine.info.name,
                    created=int(time.time()),
                    max_model_len=engine.max_model_len,
                    num_layers=plan.num_layers,
                    loop_block=(plan.start, plan.end),
                    max_loops=plan.max_loops,
                    default_loops=plan.default_loops,
                )
            ]
        )

    @app.get("/health")
    async def health() -> Response:
        holder.ready()
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
