"""lm-eval's `local-completions` model with `loops` in every request it sends.

lm-eval passes generation kwargs only to generate requests; its loglikelihood requests
(multiple-choice tasks) carry none, so they would run at the server's default depth.
Registered as `loopserve-completions` (`--model_args ...,loops=K`) for lm-eval's own CLI:

    python -m loopserve.benchmarks.lmeval_model --model loopserve-completions ...
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.openai_completions import LocalCompletionsAPI


@register_model("loopserve-completions")
class LoopserveCompletions(LocalCompletionsAPI):
    def __init__(self, loops: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loops = int(loops)

    def _create_payload(self, *args: Any, **kwargs: Any) -> dict:
        return {**super()._create_payload(*args, **kwargs), "loops": self.loops}


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
