"""Prometheus metrics of one server (``GET /metrics``, text format): requests and errors by status, latency,
batch sizes and tokens. Each app has its own registry, so several apps can live in one process."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's counters and histograms; safe to update from the batcher thread."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fed_userllm_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("fed_userllm_request_duration_seconds", "from the request to the last byte of "
                                 "its answer (streams included)", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.batch_size = Histogram("fed_userllm_batch_size", "requests answered by one model call",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("fed_userllm_batch_duration_seconds", "time of one batched model call",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("fed_userllm_generated_tokens", "new tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("fed_userllm_prompt_tokens", "prompt tokens read", registry=self.registry)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def answered(self, tokens: int, prompt_tokens: int) -> None:
        self.tokens.inc(tokens)
        self.prompt_tokens.inc(prompt_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: counts each request to ``paths`` by status and observes its latency when the last byte
    of the answer is sent, so a streamed answer is timed to its end."""

    def __init__(self, app, metrics: Metrics, paths: tuple[str, ...]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.requests.labels(scope["path"], str(status)).inc()
            self.metrics.latency.labels(scope["path"]).observe(time.perf_counter() - start)
