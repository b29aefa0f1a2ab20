"""Typed Python client for loopserve (httpx; sync and async), `loops` first-class.

Responses come back as typed models (clients/types.py), so `usage.total_flops` and the
other loop fields are typed. Retries with exponential backoff on 429/503 and on
connection errors, which is what a server still loading its model answers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from loopserve.clients.types import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ModelList,
)

RETRY_STATUS = (429, 503)


class LoopserveError(RuntimeError):
    """The server answered with an error; carries its status and OpenAI error body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        message = (
            body.get("error", {}).get("message", str(body)) if isinstance(body, dict) else body
        )
        super().__init__(f"HTTP {status}: {message}")


def _payload(loops: int | None, stream: bool, fields: dict[str, Any]) -> dict[str, Any]:
    body = {key: value for key, value in fields.items() if value is not None}
    if loops is not None:
        body["vllm_xargs"] = {**body.get("vllm_xargs", {}), "loops": loops}
    if stream:
        body["stream"] = True
    return body


def _raise_for(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text}}
        raise LoopserveError(response.status_code, body)


DONE: dict[str, Any] = {}


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """One SSE line: an event, None for a non-data line, DONE at the end of the stream.

    An error event (a failure after the response started) raises LoopserveError.
    """
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if data == "[DONE]":
        return DONE
    event = json.loads(data)
    if "error" in event:
        raise LoopserveError(500, event)
    return event


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        event = parse_sse_line(line)
        if event is DONE:
            return
        if event is not None:
            yield event


def _backoff(attempt: int, base: float) -> float:
    return base * (2**attempt)


class _ClientBase:
    """Connection settings shared by the sync and async clients."""

    _transport: type = httpx.Client

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = self._transport(base_url=base_url, headers=headers, timeout=timeout)
        self.retries, self.backoff = retries, backoff


class LoopserveClient(_ClientBase):
    """Synchronous client. `with LoopserveClient(url) as client: client.complete(...)`."""

    def __enter__(self) -> LoopserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, json=body)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            else:
                if response.status_code not in RETRY_STATUS or attempt == self.retries:
                    _raise_for(response)
                    return response
            time.sleep(_backoff(attempt, self.backoff))
        raise AssertionError("unreachable")

    def models(self) -> ModelList:
        return ModelList.model_validate(self._send("GET", "/v1/models").json())

    def complete(
        self, prompt: str | list[int], *, loops: int | None = None, **fields: Any
    ) -> CompletionResponse:
        body = _payload(loops, False, {"prompt": prompt, **fields})
        return CompletionResponse.model_validate(self._send("POST", "/v1/completions", body).json())

    def chat(
        self, messages: list[dict[str, Any]], *, loops: int | None = None, **fields: Any
    ) -> ChatCompletionResponse:
        body = _payload(loops, False, {"messages": messages, **fields})
        response = self._send("POST", "/v1/chat/completions", body)
        return ChatCompletionResponse.model_validate(response.json())

    def stream_complete(
        self, prompt: str | list[int], *, loops: int | None = None, **fields: Any
    ) -> Iterator[CompletionResponse]:
        body = _payload(loops, True, {"prompt": prompt, **fields})
        for event in self._stream("/v1/completions", body):
            yield CompletionResponse.model_validate(event)

    def stream_chat(
        self, messages: list[dict[str, Any]], *, loops: int | None = None, **fields: Any
    ) -> Iterator[ChatCompletionChunk]:
        body = _payload(loops, True, {"messages": messages, **fields})
        for event in self._stream("/v1/chat/completions", body):
            yield ChatCompletionChunk.model_validate(event)

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._http.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            yield from _events(response.iter_lines())


class AsyncLoopserveClient(_ClientBase):
    """Asynchronous twin of `LoopserveClient`."""

    _transport = httpx.AsyncClient

    async def __aenter__(self) -> AsyncLoopserveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.request(method, path, json=body)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            else:
                if response.status_code not in RETRY_STATUS or attempt == self.retries:
                    _raise_for(response)
                    return response
            await asyncio.sleep(_backoff(attempt, self.backoff))
        raise AssertionError("unreachable")

    async def models(self) -> ModelList:
        return ModelList.model_validate((await self._send("GET", "/v1/models")).json())

    async def complete(
        self, prompt: str | list[int], *, loops: int | None = None, **fields: Any
    ) -> CompletionResponse:
        body = _payload(loops, False, {"prompt": prompt, **fields})
        response = await self._send("POST", "/v1/completions", body)
        return CompletionResponse.model_validate(response.json())

    async def chat(
        self, messages: list[dict[str, Any]], *, loops: int | None = None, **fields: Any
    ) -> ChatCompletionResponse:
        body = _payload(loops, False, {"messages": messages, **fields})
        response = await self._send("POST", "/v1/chat/completions", body)
        return ChatCompletionResponse.model_validate(response.json())

    async def stream_complete(
        self, prompt: str | list[int], *, loops: int | None = None, **fields: Any
    ) -> AsyncIterator[CompletionResponse]:
        body = _payload(loops, True, {"prompt": prompt, **fields})
        async for event in self._stream("/v1/completions", body):
            yield CompletionResponse.model_validate(event)

    async def stream_chat(
        self, messages: list[dict[str, Any]], *, loops: int | None = None, **fields: Any
    ) -> AsyncIterator[ChatCompletionChunk]:
        body = _payload(loops, True, {"messages": messages, **fields})
        async for event in self._stream("/v1/chat/completions", body):
            yield ChatCompletionChunk.model_validate(event)

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with self._http.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                _raise_for(response)
            async for line in response.aiter_lines():
                event = parse_sse_line(line)
                if event is DONE:
                    return
                if event is not None:
                    yield event
