"""loopserve's Python client: the `openai` SDK plus what is about looping.

It adds three things to `openai.OpenAI` / `openai.AsyncOpenAI` (reachable as `.openai`
for everything else): `loops` per call (sent in `extra_body`), responses typed with the
loop fields of `usage` and `/v1/models` (clients/types.py), and waiting for a server
that is still starting. vLLM refuses connections until its engine is ready, so a refused
connection is retried until `wait` seconds have passed; an HTTP error, 503 included, is
the server's answer and is raised at once (the SDK's own retries are off). Errors are
the SDK's (`openai.APIStatusError` and its subclasses).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
from openai.pagination import AsyncPage, SyncPage

from loopserve.clients.types import (
    LoopChatCompletion,
    LoopChatCompletionChunk,
    LoopCompletion,
    LoopModel,
)

RETRY_INTERVAL = 0.5  # seconds between attempts to reach a server that is starting


def _refused(error: BaseException | None) -> bool:
    """Whether a connect error is a refused connection (nothing listens on the port yet)."""
    while error is not None:
        if isinstance(error, ConnectionRefusedError):
            return True
        error = error.__cause__ or error.__context__
    return False


class _WaitForServer(httpx2.HTTPTransport):
    """Retries a refused connection until `wait` seconds have passed."""

    def __init__(self, wait: float) -> None:
        super().__init__()
        self.wait = wait

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        deadline = time.monotonic() + self.wait
        while True:
            try:
                return super().handle_request(request)
            except httpx2.ConnectError as error:
                if not _refused(error) or time.monotonic() >= deadline:
                    raise
            time.sleep(RETRY_INTERVAL)


class _AsyncWaitForServer(httpx2.AsyncHTTPTransport):
    """`_WaitForServer` for the asynchronous client."""

    def __init__(self, wait: float) -> None:
        super().__init__()
        self.wait = wait

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        deadline = time.monotonic() + self.wait
        while True:
            try:
                return await super().handle_async_request(request)
            except httpx2.ConnectError as error:
                if not _refused(error) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(RETRY_INTERVAL)


def _sdk_options(base_url: str, api_key: str | None, timeout: float) -> dict[str, Any]:
    # The SDK insists on a key; a server started without --api-key ignores it.
    return {
        "base_url": f"{base_url.rstrip('/')}/v1",
        "api_key": api_key or "unused",
        "timeout": timeout,
        "max_retries": 0,
    }


def _request(fields: dict[str, Any], loops: int | None, model: str) -> dict[str, Any]:
    """The SDK call's arguments: `loops` joins `extra_body`, `model` unless one is given."""
    request = {"model": model, **fields}
    if loops is not None:
        request["extra_body"] = {**request.get("extra_body", {}), "loops": loops}
    return request


class LoopserveClient:
    """`with LoopserveClient(url) as client: client.complete(prompt, loops=2)`.

    `fields` of each call are the SDK's `create` arguments; `model` defaults to the first
    model the server lists.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout: float = 120.0,
        wait: float = 0.0,
    ) -> None:
        http = openai.DefaultHttpxClient(transport=_WaitForServer(wait))
        self.openai = openai.OpenAI(**_sdk_options(base_url, api_key, timeout), http_client=http)
        self.model = model

    def __enter__(self) -> LoopserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.openai.close()

    def models(self) -> SyncPage[LoopModel]:
        return self.openai.models.with_raw_response.list().parse(to=SyncPage[LoopModel])

    def _request(self, fields: dict[str, Any], loops: int | None) -> dict[str, Any]:
        if self.model is None and "model" not in fields:
            self.model = self.models().data[0].id
        return _request(fields, loops, self.model)

    def complete(
        self, prompt: str | list[int], *, loops: int | None = None, **fields: Any
    ) -> LoopCompletion:
        raw = self.openai.completions.with_raw_response.create(
            prompt=prompt, **self._request(fields, loops)
        )
        return raw.parse(to=LoopCompletion)

    def chat(
        self, messages: list[dict[str, Any]], *, loops: int | None = None, **fields: Any
    ) -> LoopChatCompletion:
        raw = self.openai.chat.completions.with_raw_response.create(
            messages=messages, **self._request(fields, loops)
        )
        return raw.parse(to=LoopChatCompletion)

    def stream_complete(
        self, prompt: str | list[int], *, loops: int | None = None, **fields: Any
    ) -> openai.Stream[LoopCompletion]:
        raw = self.openai.completions.with_raw_response.create(
            prompt=prompt, stream=True, **self._request(fields, loops)
        )
        return raw.parse(to=openai.Stream[LoopCompletion])

    def stream_chat(
        self, messages: list[dict[str, Any]], *, loops: int | None = None, **fields: Any
    ) -> openai.Stream[LoopChatCompletionChunk]:
        raw = self.openai.chat.completions.with_raw_response.create(
            messages=messages, stream=True, **self._request(fields, loops)
        )
        return raw.parse(to=openai.Stream[LoopChatCompletionChunk])


class AsyncLoopserveClient:
    """The asynchronous twin of `LoopserveClient`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout: float = 120.0,
        wait: float = 0.0,
    ) -> None:
        http = openai.DefaultAsyncHttpxClient(transport=_AsyncWaitForServer(wait))
        self.openai = openai.AsyncOpenAI(
            **_sdk_options(base_url, api_key, timeout), http_client=http
        )
        self.model = model

    async def __aenter__(self) -> AsyncLoopserveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.openai.close()

    async def models(self) -> AsyncPage[LoopModel]:
        raw = await self.openai.models.with_raw_response.list()
        return raw.parse(to=AsyncPage[LoopModel])

    async def _request(self, fields: dict[str, Any], loops: int | None) -> dict[str, Any]:
        if self.model is None and "model" not in fields:
            self.model = (await self.models()).data[0].id
        return _request(fields, loops, self.model)

    async def complete(
        self, prompt: str | list[int], *, loops: int | None = None, **fields: Any
    ) -> LoopCompletion:
        raw = await self.openai.completions.with_raw_response.create(
            prompt=prompt, **await self._request(fields, loops)
        )
        return raw.parse(to=LoopCompletion)

    async def chat(
        self, messages: list[dict[str, Any]], *, loops: int | None = None, **fields: Any
    ) -> LoopChatCompletion:
        raw = await self.openai.chat.completions.with_raw_response.create(
            messages=messages, **await self._request(fields, loops)
        )
        return raw.parse(to=LoopChatCompletion)

    async def stream_complete(
        self, prompt: str | list[int], *, loops: int | None = None, **fields: Any
    ) -> AsyncIterator[LoopCompletion]:
        raw = await self.openai.completions.with_raw_response.create(
            prompt=prompt, stream=True, **await self._request(fields, loops)
        )
        async with raw.parse(to=openai.AsyncStream[LoopCompletion]) as stream:
            async for chunk in stream:
                yield chunk

    async def stream_chat(
        self, messages: list[dict[str, Any]], *, loops: int | None = None, **fields: Any
    ) -> AsyncIterator[LoopChatCompletionChunk]:
        raw = await self.openai.chat.completions.with_raw_response.create(
            messages=messages, stream=True, **await self._request(fields, loops)
        )
        async with raw.parse(to=openai.AsyncStream[LoopChatCompletionChunk]) as stream:
            async for chunk in stream:
                yield chunk
