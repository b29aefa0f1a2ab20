"""OpenAI completions and chat completions on the loop engine: requests in, responses out.

The app validates JSON into protocol models; this module tokenizes, checks the context
budget, runs the engine (one engine request per prompt, n choices each, all prompts
concurrently) and shapes the results, whole or as SSE chunks, with usage that prices
every choice with the one FLOPs model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from loopserve.server.engine import LoopEngine
from loopserve.server.loop_plan import LOOPS_KEY, LoopPlanError
from loopserve.server.metrics import Metrics, RequestTimer
from loopserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    Usage,
)

DEFAULT_COMPLETION_TOKENS = 16

logger = logging.getLogger("loopserve")


class ClientError(ValueError):
    """A request the engine cannot serve as asked (HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Delta:
    """New output of one choice in one engine step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[Any]
    finish_reason: str | None


@dataclass
class Choice:
    """What one choice accumulates over its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason


@dataclass
class Job:
    """One engine request: a tokenized prompt and its n choices."""

    prompt_ids: list[int]
    prompt_text: str
    choices: list[Choice]
    prompt_logprobs: list[Any] | None = None


@dataclass
class Call:
    """One HTTP request being served."""

    id: str
    created: int
    model: str
    req: SamplingFields
    jobs: list[Job]
    params: Any  # vLLM SamplingParams, built (and so validated) before any work starts
    loops: int


class Serving:
    def __init__(self, engine: LoopEngine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.tokenizer = engine.tokenizer

    # ----- public entry points ----------------------------------------------------------

    async def completions(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        jobs = []
        for prompt in req.prompts():
            if isinstance(prompt, str):
                ids, text = self.tokenizer.encode(prompt), prompt
            else:
                ids = self._checked_ids(list(prompt))
                text = self.tokenizer.decode(ids)
            jobs.append(Job(ids, text, [Choice() for _ in range(req.n)]))
        longest = max(len(job.prompt_ids) for job in jobs)
        sampling = {
            **req.sampling_args(),
            "max_tokens": self._max_tokens(req, longest, DEFAULT_COMPLETION_TOKENS, "prompt"),
            "logprobs": req.logprobs,
            "prompt_logprobs": req.logprobs if req.echo and req.logprobs is not None else None,
        }
        call = self._call("cmpl", req, jobs, sampling)
        if req.stream:
            return self._stream(call, "completions")
        await self._run_whole(call, "completions")
        return CompletionResponse(
            id=call.id,
            created=call.created,
            model=call.model,
            choices=[
                CompletionChoice(
                    index=i * req.n + j,
                    text=(job.prompt_text if req.echo else "") + choice.text,
                    logprobs=self._completion_logprobs(job, choice, req.echo)
                    if req.logprobs is not None
                    else None,
                    finish_reason=choice.finish_reason,
                )
                for i, job in enumerate(jobs)
                for j, choice in enumerate(job.choices)
            ],
            usage=self.usage(call),
        )

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages
        ]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as error:  # the template itself rejects the conversation
            raise ClientError(
                f"messages do not fit the chat template: {error}", "messages"
            ) from error
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        jobs = [Job(ids, text, [Choice() for _ in range(req.n)])]
        sampling = {
            **req.sampling_args(),
            "max_tokens": self._max_tokens(req, len(ids), None, "messages"),
            "logprobs": (req.top_logprobs or 0) if req.logprobs else None,
        }
        call = self._call("chatcmpl", req, jobs, sampling)
        if req.stream:
            return self._stream(call, "chat")
        await self._run_whole(call, "chat")
        return ChatCompletionResponse(
            id=call.id,
            created=call.created,
            model=call.model,
            choices=[
                ChatChoice(
                    index=j,
                    message=AssistantMessage(content=choice.text),
                    logprobs=self._chat_logprobs(
                        choice.token_ids, choice.logprobs, req.top_logprobs or 0
                    )
                    if req.logprobs
                    else None,
                    finish_reason=choice.finish_reason,
                )
                for j, choice in enumerate(jobs[0].choices)
            ],
            usage=self.usage(call),
        )

    # ----- preparation ------------------------------------------------------------------

    def _call(self, kind: str, req: SamplingFields, jobs: list[Job], sampling: dict) -> Call:
        try:
            params = self.engine.sampling_params(sampling, req.loops)
        except LoopPlanError as error:
            raise ClientError(str(error), "loops") from error
        except ValueError as error:  # vLLM's own checks, e.g. min_tokens > max_tokens
            raise ClientError(str(error)) from error
        return Call(
            id=f"{kind}-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.engine.info.name,
            req=req,
            jobs=jobs,
            params=params,
            loops=params.extra_args[LOOPS_KEY],
        )

    def _max_tokens(
        self, req: SamplingFields, prompt_len: int, default: int | None, prompt_param: str
    ) -> int:
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise ClientError(
                f"the prompt has {prompt_len} tokens; this model's context is {limit} tokens",
                prompt_param,
            )
        room = limit - prompt_len
        if req.max_tokens is None:
            return room if default is None else min(default, room)
        if req.max_tokens > room:
            raise ClientError(
                f"this model's maximum context length is {limit} tokens; the request asks for "
                f"{prompt_len + req.max_tokens} ({prompt_len} in the prompt, {req.max_tokens} "
                "for the completion)",
                "max_tokens",
            )
        return req.max_tokens

    def _checked_ids(self, ids: list[int]) -> list[int]:
        vocab = self.engine.info.shape.vocab_size
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise ClientError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}", "prompt")
        return ids

    # ----- running ----------------------------------------------------------------------

    async def _deltas(self, call: Call) -> AsyncIterator[tuple[int, list[Delta]]]:
        """Run every job concurrently; yield (job index, deltas) as engine steps land."""
        queue: asyncio.Queue[tuple[int, list[Delta]] | None] = asyncio.Queue()

        async def pump(i: int, job: Job) -> None:
            stream = self.engine.generate(job.prompt_ids, call.params.clone(), f"{call.id}-{i}")
            async for output in stream:
                if job.prompt_logprobs is None and output.prompt_logprobs is not None:
                    job.prompt_logprobs = list(output.prompt_logprobs)
                deltas = [
                    Delta(
                        c.index, c.text, list(c.token_ids), list(c.logprobs or []), c.finish_reason
                    )
                    for c in output.outputs
                ]
                for delta in deltas:
                    job.choices[delta.index].add(delta)
                await queue.put((i, deltas))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(call.jobs)]
        everything = asyncio.gather(*tasks)
        everything.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (item := await queue.get()) is not None:
                yield item
            await everything  # re-raises the first engine error
        finally:
            for task in tasks:
                task.cancel()  # client gone or a sibling failed: abort what still runs
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_whole(self, call: Call, endpoint: str) -> None:
        timer = self.metrics.start(endpoint, call.loops)
        status = 500
        try:
            async for _, deltas in self._deltas(call):
                timer.tokens(sum(len(d.token_ids) for d in deltas))
            status = 200
        finally:
            timer.finish(status, self.usage(call).total_flops if status == 200 else 0)

    async def _stream(self, call: Call, endpoint: str) -> AsyncIterator[str]:
        timer: RequestTimer = self.metrics.start(endpoint, call.loops)
        status = 499  # the client hung up before the end
        chat = endpoint == "chat"
        try:
            if chat:
                yield sse(
                    self._chat_chunk(
                        call,
                        [
                            ChatChunkChoice(index=j, delta=ChatDelta(role="assistant", content=""))
                            for j in range(call.req.n)
                        ],
                    )
                )
            async for i, deltas in self._deltas(call):
                timer.tokens(sum(len(d.token_ids) for d in deltas))
                yield sse(
                    self._chat_chunk_of(call, deltas)
                    if chat
                    else self._completion_chunk(call, i, deltas)
                )
            if call.req.stream_options is not None and call.req.stream_options.include_usage:
                chunk = self._chat_chunk(call, []) if chat else self._completion_base(call)
                chunk.usage = self.usage(call)
                yield sse(chunk)
            status = 200
            yield "data: [DONE]\n\n"
        except Exception as error:  # the engine failed after the headers went out
            logger.exception("loopserve: stream %s failed", call.id)
            status = 500
            body = {
                "message": f"generation failed: {type(error).__name__}",
                "type": "server_error",
                "param": None,
                "code": 500,
            }
            yield f"data: {json.dumps({'error': body})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            timer.finish(status, self.usage(call).total_flops if status == 200 else 0)

    # ----- shaping ----------------------------------------------------------------------

    def usage(self, call: Call) -> Usage:
        flops = self.engine.info.flops
        prompt_tokens = completion_tokens = prompt_flops = completion_flops = 0
        for job in call.jobs:
            p = len(job.prompt_ids)
            prompt_tokens += p
            prompt_flops += flops.span(call.loops, 0, p)
            for choice in job.choices:
                c = len(choice.token_ids)
                completion_tokens += c
                completion_flops += flops.span(call.loops, p, p + c)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            loops=call.loops,
            prompt_flops=prompt_flops,
            completion_flops=completion_flops,
            total_flops=prompt_flops + completion_flops,
        )

    def _completion_base(self, call: Call) -> CompletionResponse:
        return CompletionResponse(id=call.id, created=call.created, model=call.model, choices=[])

    def _completion_chunk(self, call: Call, job_index: int, deltas: list[Delta]) -> Any:
        chunk = self._completion_base(call)
        for delta in deltas:
            logprobs = None
            if call.req.logprobs is not None:
                logprobs = CompletionLogprobs()
                self._append_logprobs(logprobs, delta.token_ids, delta.logprobs, 0)
            chunk.choices.append(
                CompletionChoice(
                    index=job_index * call.req.n + delta.index,
                    text=delta.text,
                    logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                )
            )
        return chunk

    def _chat_chunk(self, call: Call, choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=call.id, created=call.created, model=call.model, choices=choices
        )

    def _chat_chunk_of(self, call: Call, deltas: list[Delta]) -> ChatCompletionChunk:
        req = call.req
        return self._chat_chunk(
            call,
            [
                ChatChunkChoice(
                    index=d.index,
                    delta=ChatDelta(content=d.text),
                    logprobs=self._chat_logprobs(d.token_ids, d.logprobs, req.top_logprobs or 0)
                    if req.logprobs
                    else None,
                    finish_reason=d.finish_reason,
                )
                for d in deltas
            ],
        )

    def _token_text(self, token_id: int, logprob: Any) -> str:
        text = getattr(logprob, "decoded_token", None)
        return text if text is not None else self.tokenizer.decode([token_id])

    def _append_logprobs(
        self, out: CompletionLogprobs, ids: list[int], positions: list[Any], offset: int
    ) -> int:
        """Append per-token logprobs (vLLM's {token_id: Logprob} per position)."""
        for token_id, top in zip(ids, positions, strict=False):
            if top is None:  # the first prompt token has no logprob
                token = self.tokenizer.decode([token_id])
                out.tokens.append(token)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                token = self._token_text(token_id, top[token_id])
                out.tokens.append(token)
                out.token_logprobs.append(top[token_id].logprob)
                out.top_logprobs.append(
                    {self._token_text(t, lp): lp.logprob for t, lp in top.items()}
                )
            out.text_offset.append(offset)
            offset += len(token)
        return offset

    def _completion_logprobs(self, job: Job, choice: Choice, echo: bool) -> CompletionLogprobs:
        out = CompletionLogprobs()
        offset = 0
        if echo and job.prompt_logprobs is not None:
            offset = self._append_logprobs(out, job.prompt_ids, job.prompt_logprobs, 0)
        self._append_logprobs(out, choice.token_ids, choice.logprobs, offset)
        return out

    def _chat_logprobs(self, ids: list[int], positions: list[Any], top_n: int) -> ChatLogprobs:
        content = []
        for token_id, top in zip(ids, positions, strict=False):
            ranked = sorted(top.items(), key=lambda item: item[1].rank)[:top_n]
            token = self._token_text(token_id, top[token_id])
            content.append(
                TokenLogprob(
                    token=token,
                    logprob=top[token_id].logprob,
                    bytes=list(token.encode()),
                    top_logprobs=[
                        TopLogprob(
                            token=(t := self._token_text(i, lp)),
                            logprob=lp.logprob,
                            bytes=list(t.encode()),
                        )
                        for i, lp in ranked
                    ],
                )
            )
        return ChatLogprobs(content=content)


def sse(payload: Any) -> str:
    return f"data: {payload.model_dump_json()}\n\n"
