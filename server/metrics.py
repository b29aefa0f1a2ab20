"""loopserve's Prometheus metrics, served by vLLM's /metrics beside its `vllm:*` metrics.

Counted per engine request as its outputs reach the server, for every route that
generates (completions, chat, responses, ...): a request the client abandons stops
adding generated tokens when vLLM aborts it. Registered once per process in
prometheus_client's default registry, the one vLLM's /metrics exposes.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from loopserve.server.flops import FlopsModel
from loopserve.server.loop_usage import SequenceTally


@dataclass(frozen=True)
class LoopMetrics:
    requests: Counter
    running: Gauge
    generated_tokens: Counter
    flops: Counter

    async def track(
        self, stream: AsyncIterator[Any], loops: int, model: FlopsModel, cumulative: bool
    ) -> AsyncIterator[Any]:
        """Pass one engine request's outputs through, counting them."""
        tally = SequenceTally()
        self.running.inc()
        try:
            async with aclosing(stream):  # closing us closes vLLM's stream: it aborts
                async for output in stream:
                    self.generated_tokens.inc(tally.observe(0, output, cumulative))
                    yield output
        finally:
            self.running.dec()
            self.requests.labels(loops=str(loops)).inc()
            self.flops.inc(sum(tally.flops(model, loops)))


@functools.cache
def loop_metrics() -> LoopMetrics:
    return LoopMetrics(
        requests=Counter("loopserve_requests", "Engine requests finished, by loops", ["loops"]),
        running=Gauge("loopserve_requests_running", "Engine requests in flight"),
        generated_tokens=Counter(
            "loopserve_generated_tokens", "Tokens generated (as received from the engine)"
        ),
        flops=Counter("loopserve_flops", "Forward FLOPs served (loopserve's FLOPs model)"),
    )
