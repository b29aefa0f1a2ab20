"""Per-sequence token counts of one request, and the loop fields of its `usage`.

FLOPs depend on each sequence's own length (attention grows with context), so they are
summed per sequence, never computed from totals: n > 1, several prompts and echo all
price exactly. Counts come from vLLM's `RequestOutput`s as the server receives them.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loopserve.server.flops import FlopsModel


@dataclass
class SequenceTally:
    """Prompt length per prompt, generated tokens per (prompt, choice)."""

    prompts: dict[int, int] = field(default_factory=dict)
    completions: dict[tuple[int, int], int] = field(default_factory=dict)

    def observe(self, prompt_index: int, output: Any, cumulative: bool = False) -> int:
        """Count one RequestOutput (delta or final; `cumulative` for CUMULATIVE outputs).

        Returns the tokens it adds.
        """
        if output.prompt_token_ids is not None:
            self.prompts[prompt_index] = len(output.prompt_token_ids)
        added = 0
        for sequence in output.outputs:
            key = (prompt_index, sequence.index)
            before = self.completions.get(key, 0)
            count = len(sequence.token_ids)
            new = count - before if cumulative else count
            self.completions[key] = before + new
            added += new
        return added

    def flops(self, model: FlopsModel, loops: int) -> tuple[int, int]:
        """(prompt FLOPs, completion FLOPs): each prompt once, each choice on its own length."""
        prompt = sum(model.span(loops, 0, p) for p in self.prompts.values())
        completion = sum(
            model.span(loops, self.prompts.get(i, 0), self.prompts.get(i, 0) + c)
            for (i, _), c in self.completions.items()
        )
        return prompt, completion

    def usage_fields(self, model: FlopsModel, loops: int) -> dict[str, int]:
        prompt, completion = self.flops(model, loops)
        return {
            "loops": loops,
            "prompt_flops": prompt,
            "completion_flops": completion,
            "total_flops": prompt + completion,
        }
