"""Prometheus metrics of the gateway, in a registry of its own so several apps can live in one process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def route_label(scope: Scope) -> str:
    """The template of the route that served the request, never the path it was sent to: a scanner's
    made-up paths all become `other`, so the series stay as many as the routes (security review H5)."""
    route = scope.get("route")
    return getattr(route, "path", "other") if route is not None else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tally_gateway_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("tally_gateway_request_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.accepted = Counter("tally_gateway_events_accepted", "events acked by Kafka", ["route"], registry=r)
        self.rejected = Counter("tally_gateway_events_rejected", "events refused, by reason", ["route", "reason"], registry=r)
        self.produce_latency = Histogram("tally_gateway_produce_seconds", "time from produce to the last delivery report",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("tally_gateway_producer_queue_depth", "messages waiting in the producer", registry=r)
        self.rate_limited = Counter("tally_gateway_rate_limited", "requests refused with 429", ["route"], registry=r)
        self.replays = Counter("tally_gateway_idempotent_replays", "stored responses replayed", ["route"], registry=r)
        self.redis_failures = Counter("tally_gateway_redis_failures", "Redis calls that failed, by operation",
                                      ["operation"], registry=r)
        self.webhooks_refused = Counter("tally_gateway_webhooks_refused", "webhooks refused, by source and reason",
                                        ["source", "reason"], registry=r)
        self._per_request: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        """One request's latency and status, counted the same way for both intake adapters and every other
        route; the labelled series are looked up once per (route, status), not on every request."""
        series = self._per_request.get((route, status))
        if series is None:
            series = self._per_request[route, status] = (self.latency.labels(route),
                                                          self.requests.labels(route, str(status)))
        series[0].observe(seconds)
        series[1].inc()

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts and times every request; plain ASGI so it adds no per-request task or copy of the body."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(route_label(scope), status, time.perf_counter() - start)
