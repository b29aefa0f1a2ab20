"""Prometheus metrics of the HTTP server (one registry per app, so tests can run several)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loopserve_requests", "Finished requests", ["endpoint", "status", "loops"], registry=r
        )
        self.running = Gauge("loopserve_requests_running", "Requests in flight", registry=r)
        self.generated_tokens = Counter(
            "loopserve_generated_tokens", "Completion tokens generated", registry=r
        )
        self.flops = Counter("loopserve_flops", "Forward FLOPs served (FLOPs model)", registry=r)
        self.ttft = Histogram(
            "loopserve_time_to_first_token_seconds",
            "Time to first token",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            "loopserve_inter_token_latency_seconds",
            "Time between streamed tokens",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.e2e = Histogram(
            "loopserve_e2e_request_latency_seconds",
            "End-to-end request latency",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def start(self, endpoint: str, loops: int) -> RequestTimer:
        self.running.inc()
        return RequestTimer(self, endpoint, loops)


@dataclass
class RequestTimer:
    """Times one request; `finish` must be called exactly once (in a finally)."""

    metrics: Metrics
    endpoint: str
    loops: int
    started: float = field(default_factory=time.perf_counter)
    last_token: float | None = None

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.last_token is None:
            self.metrics.ttft.observe(now - self.started)
        else:
            self.metrics.itl.observe((now - self.last_token) / count)
        self.last_token = now
        self.metrics.generated_tokens.inc(count)

    def finish(self, status: int, flops: int = 0) -> None:
        self.metrics.running.dec()
        self.metrics.requests.labels(self.endpoint, str(status), str(self.loops)).inc()
        self.metrics.e2e.observe(time.perf_counter() - self.started)
        if flops:
            self.metrics.flops.inc(flops)
