"""The gateway's ASGI application: the Starlette routes, the webhook route, product routes and the lifecycle.

The write routes are thin: the pipeline is `tally.ingest.intake.Intake`, which the plain-ASGI front
(`tally.ingest.asgi_intake`, ADR 2) calls too (ADR 121). Every error becomes its answer in
`tally.edge.answers.problem_answer`, here through Starlette's exception handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import asyncpg
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from tally.edge.answers import json_answer, problem_answer
from tally.edge.body import media_type, read_body
from tally.edge.problems import Problem
from tally.edge.products import Principal, Product, one_per_path
from tally.ingest import webhooks
from tally.ingest.asgi_intake import AsgiIntake
from tally.ingest.auth import KeyStore
from tally.ingest.config import GatewayConfig
from tally.ingest.idempotency import IdempotencyStore, Retention
from tally.ingest.intake import Call, Intake, WriteRoute
from tally.ingest.limits import UsageLimits
from tally.ingest.metrics import Metrics, MetricsMiddleware, route_label
from tally.ingest.openapi import DOCS_PAGE, docs_assets, document
from tally.ingest.producer import EventProducer, producer_config
from tally.ingest.publish import Publisher, fields
from tally.ingest.ratelimit import Limit, RateLimiter
from tally.ingest.reads import ReadSlots
from tally.ingest.redisguard import RedisGuard
from tally.ingest.replay import ReplayMemory
from tally.ingest.signatures import SignatureError
from tally.schemas.envelope import utcnow

log = logging.getLogger("tally.gateway")
# Container objects allocated (less those freed) before a young collection: above what the requests in flight
# hold (64 connections of single events never reached it), so a collection finds garbage, not live requests.
GC_YOUNG_THRESHOLD = 10_000


def _call(request: Request) -> Call:
    """A Starlette request as the intake pipeline reads it."""
    return Call(request.headers, request.receive, request.client.host if request.client else "unknown",
                request.method)


class Gateway:
    def __init__(self, config: GatewayConfig, products: Sequence[Product] = ()) -> None:
        self.config = config
        self.products = list(products)
        self.metrics = Metrics()
        self.intake = Intake(config, self.metrics)
        self.sources = webhooks.load_sources(config.webhooks_file)
        self.webhook_limit = Limit(config.webhook_rate_limit_per_s, config.webhook_rate_limit_burst)
        self.openapi = orjson.dumps(document(config, [p.openapi_paths() for p in self.products]))
        self.assets = docs_assets()
        self._pool: asyncpg.Pool | None = None
        self._key_pool: asyncpg.Pool | None = None
        self.reads = ReadSlots(config.reads_per_tenant, config.read_slot_wait_s)
        self._ready: tuple[float, bool, bool] | None = None
        self._probe: asyncio.Future[list[bool]] | None = None
        self.guard: RedisGuard
        self.replays: ReplayMemory

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        c = self.config
        # Key lookups and product reads on pools apart: no read can hold the connection a key check needs.
        self._key_pool = await asyncpg.create_pool(c.database_url, min_size=1, max_size=4,
                                                   command_timeout=c.key_lookup_timeout_s)
        self._pool = await asyncpg.create_pool(c.database_url, min_size=1, max_size=c.read_pool_size,
                                               server_settings={"statement_timeout": f"{int(c.read_timeout_s * 1000)}"})
        keys = KeyStore(self._key_pool, c.key_cache_ttl_s, c.key_lookup_timeout_s)
        overrides = {"message.timeout.ms": c.produce_timeout_ms, "linger.ms": c.linger_ms,
                     "message.max.bytes": c.max_message_bytes}
        producer = EventProducer(producer_config(c.kafka_bootstrap, **overrides), c.queue_full_wait_s)
        self.metrics.track_queue(producer.queue_depth)
        publisher = Publisher(producer, c.topics.events, self.metrics, c.retry_after_s, c.max_message_bytes)
        self.guard = RedisGuard.connect(c.redis_url, c.redis_timeout_s, c.redis_failure_policy, self.metrics,
                                        c.retry_after_s)
        usage_limits = UsageLimits(self.guard.client, c.redis_prefix, c.usage_limits_refresh_s)
        usage_limits.start()
        retention = Retention(c.idempotency_ttl_s, c.idempotency_error_ttl_s, c.idempotency_max_body_bytes,
                              c.idempotency_tenant_budget_bytes)
        idempotency = IdempotencyStore(self.guard, c.redis_prefix, self.metrics, retention, c.idempotency_lock_s)
        self.intake.connect(keys, RateLimiter(self.guard, c.redis_prefix), idempotency, publisher, usage_limits)
        self.replays = ReplayMemory(self.guard, c.redis_prefix)
        policy = await self.guard.eviction_policy()
        if policy not in (None, "noeviction"):
            log.warning("Redis evicts keys (maxmemory-policy %s): rate limits, replay memory and idempotency "
                        "records can be lost when it fills; give the gateway a Redis with noeviction (ADR 5)", policy)
        # What start-up built lives as long as the process: keep it out of every full collection.
        # Scanning it paused the loop 40-50 ms about once a second under batch load (ADR 2).
        gc.freeze()
        # The young generation holds every request in flight. At the default threshold of 700 the collector
        # ran some 85 times a second under 64 connections of single events, each time finding those live
        # requests and promoting them towards full collections: 2-6 µs a request in process (ADR 155).
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        log.info("gateway ready: topic %s, %d webhook source(s)", c.topics.events, len(self.sources))
        try:
            yield
        finally:
            for product in self.products:
                await product.close()
            await usage_limits.stop()
            left = producer.close()
            if left:
                log.error("shutdown: %d message(s) still undelivered after the flush", left)
            else:
                log.info("gateway stopped: producer flushed, nothing undelivered")
            await self.guard.close()
            await self._pool.close()
            await self._key_pool.close()

    async def tenant(self, request: Request, scope: str) -> str:
        """For product routes (`tally.edge.products.Edge`): the key's tenant, checked and rate-limited like a write,
        holding one of the tenant's read slots until the route answered."""
        return (await self.key(request, scope)).tenant

    async def key(self, request: Request, scope: str) -> Principal:
        """As `tenant`, with the key's id and scopes."""
        client = request.client.host if request.client else "unknown"
        route = route_label(request.scope)
        principal = await self.intake.principal(request.headers.get("authorization", ""), scope, route, client)
        await self.intake.limited(route, "reads", principal.key_id, self.intake.key_limit)
        _no_nul(request)
        await self.reads.take(request.scope, principal.tenant)
        return principal

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the pool exists once the app started"
        return self._pool

    def writes(self, route: WriteRoute) -> Callable[[Request], Awaitable[Response]]:
        """A write route's Starlette endpoint: the intake pipeline's answer as a Response."""

        async def endpoint(request: Request) -> Response:
            return (await self.intake.write(route, _call(request))).response()

        return endpoint

    async def post_webhook(self, request: Request) -> Response:
        route = "/v1/webhooks/{source}"
        name = request.path_params["source"]
        source = self.sources.get(name)
        client = request.client.host if request.client else "unknown"
        bucket = f"{name if source is not None else '(unknown)'}:{client}"
        decision = await self.intake.limited(route, "webhooks", bucket, self.webhook_limit)
        if source is None:
            raise Problem(404, "Unknown webhook source", f"no webhook source named {name!r} is configured",
                          headers=decision.headers)
        body = await read_body(request.receive, request.headers, self.config.max_webhook_bytes,
                               self.config.body_timeout_s)
        try:
            signed = source.verify(body, request.headers, request.query_params)
        except SignatureError as exc:
            self.metrics.webhooks_refused.labels(name, exc.reason).inc()
            raise Problem(401, "Invalid signature", exc.detail, reason=exc.reason, headers=decision.headers) from None
        key = webhooks.replay_key(source, signed)
        seen = await self.replays.first_time(key, source.replay_window_s)
        if seen is not None:
            self.metrics.webhooks_refused.labels(name, "replay").inc()
            if seen:
                return json_answer({"id": seen.decode(), "status": "already accepted"}, 200,
                                   {**decision.headers, "Idempotent-Replayed": "true"}).response()
            raise Problem(409, "Replayed webhook", "this signed message is still being accepted; retry shortly",
                          reason="replay", headers={**decision.headers, "Retry-After": "1"})
        now = utcnow()
        try:
            event = webhooks.to_event(source, signed, media_type(request.headers), body, now)
            await self.intake.publisher.publish_one(fields(event), source.tenant, now)
        except BaseException:
            await self.replays.forget(key)
            raise
        await self.replays.accepted(key, event.id)
        self.metrics.accepted.labels(route).inc()
        return json_answer({"id": event.id, "status": "accepted"}, 202, decision.headers).response()

    async def healthz(self, _request: Request) -> Response:
        return json_answer({"status": "ok"}).response()

    async def readyz(self, _request: Request) -> Response:
        """Kafka must answer; Redis too, unless the policy lets traffic through without it.

        One probe at a time, its answer shared for a second: a flood of probes costs no thread each."""
        if self._ready is None or self._ready[0] <= time.monotonic():
            probe = self._probe if self._probe is not None and not self._probe.done() else None
            if probe is None:
                probe = self._probe = asyncio.ensure_future(asyncio.gather(
                    asyncio.to_thread(self.intake.publisher.producer.reachable, self.config.topics.events, 2.0),
                    self.guard.ping()))
            kafka, redis = await asyncio.shield(probe)
            self._ready = (time.monotonic() + 1.0, kafka, redis)
        _, kafka, redis = self._ready
        ready = kafka and (redis or self.config.redis_failure_policy == "open")
        body = {"status": "ready" if ready else "unavailable", "kafka": "up" if kafka else "down",
                "redis": "up" if redis else f"down (policy {self.config.redis_failure_policy})"}
        return json_answer(body, 200 if ready else 503).response()

    async def metrics_page(self, _request: Request) -> Response:
        payload, content_type = self.metrics.exposition()
        return Response(payload, 200, media_type=content_type)

    async def openapi_document(self, _request: Request) -> Response:
        return Response(self.openapi, 200, media_type="application/json")

    async def docs(self, _request: Request) -> Response:
        return Response(DOCS_PAGE, 200, media_type="text/html")

    async def docs_asset(self, request: Request) -> Response:
        asset = self.assets.get(request.path_params["asset"])
        if asset is None:
            raise Problem(404, "Not Found")
        return Response(asset[0], 200, media_type=asset[1], headers={"Cache-Control": "max-age=86400"})


def _no_nul(request: Request) -> None:
    """PostgreSQL text cannot hold NUL: a product route's parameter with one is a 400 (a path naming one: no
    such resource, 404), not a failed query."""
    if any("\x00" in str(value) for value in request.path_params.values()):
        raise Problem(404, "Not Found", "no resource has a name with a NUL character")
    bad = sorted({name for name, value in request.query_params.multi_items() if "\x00" in name + value})
    if bad:
        raise Problem(400, "Invalid request", "a parameter holds a NUL character",
                      errors=[{"field": name.replace("\x00", "\\u0000"), "message": "contains a NUL character"}
                              for name in bad])


async def _problem(_request: Request, exc: Exception) -> Response:
    return problem_answer(exc).response()


async def _http_error(_request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405, as problem+json like every other error."""
    assert isinstance(exc, HTTPException)
    return problem_answer(Problem(exc.status_code, exc.detail, headers=dict(exc.headers or {}))).response()


async def _read_cancelled(_request: Request, _exc: Exception) -> Response:
    """A product read past the statement timeout (ADR 81): the database is busy or the query too broad."""
    return problem_answer(Problem(503, "Service unavailable", "the read took too long and was cancelled; narrow it "
                                  "or retry", headers={"Retry-After": "5"})).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    return problem_answer(exc, f"{request.method} {request.url.path}").response()


def create_app(config: GatewayConfig, products: Sequence[Product] = ()) -> ASGIApp:
    """The Starlette app with each product's routes, behind the plain-ASGI intake routes
    (`tally.ingest.asgi_intake`) unless `config.fast_intake` is off."""
    gateway = Gateway(config, products)
    routes = one_per_path([
        *(Route(route.path, gateway.writes(route), methods=["POST"])
          for route in (gateway.intake.events, gateway.intake.batch, gateway.intake.logs)),
        Route("/v1/webhooks/{source}", gateway.post_webhook, methods=["POST"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/readyz", gateway.readyz, methods=["GET"]),
        Route("/metrics", gateway.metrics_page, methods=["GET"]),
        Route("/openapi.json", gateway.openapi_document, methods=["GET"]),
        Route("/docs", gateway.docs, methods=["GET"]),
        Route("/docs/{asset}", gateway.docs_asset, methods=["GET"]),
        *(route for product in gateway.products for route in product.routes(gateway)),
    ])
    app = Starlette(
        routes=[gateway.reads.guard(route) for route in routes],
        middleware=[Middleware(MetricsMiddleware, metrics=gateway.metrics)],
        exception_handlers={Problem: _problem, HTTPException: _http_error,
                            asyncpg.QueryCanceledError: _read_cancelled, Exception: _server_error},
        lifespan=gateway.lifespan,
    )
    app.state.gateway = gateway
    return AsgiIntake(app, gateway.intake, gateway.metrics) if config.fast_intake else app
