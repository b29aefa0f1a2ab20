"""Typed views of the server's responses, for the client: OpenAI shapes plus loop fields.

Lenient on purpose (unknown fields kept, most fields optional): the server is vLLM's
OpenAI server, which adds fields of its own; the client types what loopserve adds
(`usage.loops`, the FLOPs, the loop plan in /v1/models) and what callers read.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Lenient):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    loops: int
    prompt_flops: int
    completion_flops: int
    total_flops: int


class CompletionChoice(_Lenient):
    index: int
    text: str
    logprobs: Any = None
    finish_reason: str | None = None


class CompletionResponse(_Lenient):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(_Lenient):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(_Lenient):
    index: int
    message: AssistantMessage
    logprobs: Any = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Lenient):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(_Lenient):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Lenient):
    index: int
    delta: ChatDelta
    logprobs: Any = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Lenient):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Lenient):
    id: str
    max_model_len: int | None = None
    num_layers: int
    loop_block: tuple[int, int]
    max_loops: int
    default_loops: int


class ModelList(_Lenient):
    data: list[ModelCard]
