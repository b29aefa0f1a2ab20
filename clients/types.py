"""The loop fields loopserve adds to OpenAI's responses, typed on the `openai` SDK's models.

Each type is the SDK's own with only loopserve's fields added, so everything else
(choices, deltas, logprobs, fields vLLM adds) stays the SDK's.
"""

from __future__ import annotations

from openai.types import Completion, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk


class LoopUsage(CompletionUsage):
    """`usage` of a loopserve response: the depth it ran at and the forward FLOPs it cost."""

    loops: int
    prompt_flops: int
    completion_flops: int
    total_flops: int


class LoopCompletion(Completion):
    usage: LoopUsage | None = None


class LoopChatCompletion(ChatCompletion):
    usage: LoopUsage | None = None


class LoopChatCompletionChunk(ChatCompletionChunk):
    usage: LoopUsage | None = None


class LoopModel(Model):
    """An entry of /v1/models with the server's loop plan."""

    max_model_len: int | None = None
    num_layers: int
    loop_block: tuple[int, int]
    max_loops: int
    default_loops: int
