"""The gateway's ASGI application: routes, the pipeline every write goes through, and the lifecycle.

Every write: API key (or webhook signature) -> rate limit -> Idempotency-Key -> body within its limit
-> validation -> Kafka delivery report -> 202. Anything else is a problem+json with its status.
The two hot routes take the same steps as plain ASGI in front of this app (`tally.ingest.asgi_intake`, ADR 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timedelta

import asyncpg
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from tally.ingest import batch, events, limits, logs, otlp, values, webhooks
from tally.ingest.auth import KeyStore, Principal
from tally.edge.body import media_type, parse_json, read_body, unsupported
from tally.ingest.config import GatewayConfig
from tally.ingest.asgi_intake import AsgiIntake
from tally.ingest.idempotency import HEADER as IDEMPOTENCY_HEADER
from tally.ingest.idempotency import IdempotencyStore, Retention, fingerprint, incomplete, parse_key
from tally.ingest.limits import UsageLimits
from tally.ingest.metrics import Metrics, MetricsMiddleware, route_label
from tally.ingest.openapi import DOCS_PAGE, docs_assets, document
from tally.edge.problems import MEDIA_TYPE as PROBLEM_TYPE
from tally.edge.problems import Problem
from tally.edge.products import Product, one_per_path
from tally.ingest.producer import EventProducer, producer_config
from tally.ingest.publish import Publisher, fields
from tally.ingest.ratelimit import Decision, Limit, RateLimiter
from tally.ingest.reads import ReadSlots
from tally.ingest.redisguard import RedisGuard
from tally.ingest.replay import ReplayMemory
from tally.ingest.signatures import SignatureError
from tally.schemas.envelope import utcnow

log = logging.getLogger("tally.gateway")

Handler = Callable[[Request, Principal, bytes], Awaitable[Response]]


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


LOG_MEDIA = (*logs.LOG_TYPES, otlp.PROTOBUF)


def _outcome(outcome: batch.Outcome) -> Response:
    """A batch's answer; with items Kafka did not take it is not kept under its Idempotency-Key."""
    response = _json(outcome.body, outcome.status)
    return incomplete(response) if outcome.failed else response


class Gateway:
    def __init__(self, config: GatewayConfig, products: Sequence[Product] = ()) -> None:
        self.config = config
        self.products = list(products)
        self.metrics = Metrics()
        self.sources = webhooks.load_sources(config.webhooks_file)
        self.key_limit = Limit(config.rate_limit_per_s, config.rate_limit_burst)
        self.webhook_limit = Limit(config.webhook_rate_limit_per_s, config.webhook_rate_limit_burst)
        self.lookup_limit = Limit(config.key_lookup_rate_limit_per_s, config.key_lookup_rate_limit_burst)
        self.openapi = orjson.dumps(document(config, [p.openapi_paths() for p in self.products]))
        self.assets = docs_assets()
        self._pool: asyncpg.Pool | None = None
        self._key_pool: asyncpg.Pool | None = None
        self.reads = ReadSlots(config.reads_per_tenant, config.read_slot_wait_s)
        self._ready: tuple[float, bool, bool] | None = None
        self._probe: asyncio.Future[list[bool]] | None = None
        self.keys: KeyStore
        self.publisher: Publisher
        self.guard: RedisGuard
        self.limiter: RateLimiter
        self.idempotency: IdempotencyStore
        self.replays: ReplayMemory
        self.limits: UsageLimits

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        c = self.config
        # Key lookups and product reads on pools apart: no read can hold the connection a key check needs.
        self._key_pool = await asyncpg.create_pool(c.database_url, min_size=1, max_size=4,
                                                   command_timeout=c.key_lookup_timeout_s)
        self._pool = await asyncpg.create_pool(c.database_url, min_size=1, max_size=c.read_pool_size,
                                               server_settings={"statement_timeout": f"{int(c.read_timeout_s * 1000)}"})
        self.keys = KeyStore(self._key_pool, c.key_cache_ttl_s, c.key_lookup_timeout_s)
        overrides = {"message.timeout.ms": c.produce_timeout_ms, "linger.ms": c.linger_ms,
                     "message.max.bytes": c.max_message_bytes}
        producer = EventProducer(producer_config(c.kafka_bootstrap, **overrides), c.queue_full_wait_s)
        self.metrics.track_queue(producer.queue_depth)
        self.publisher = Publisher(producer, c.topics.events, self.metrics, c.retry_after_s, c.max_message_bytes)
        self.guard = RedisGuard.connect(c.redis_url, c.redis_timeout_s, c.redis_failure_policy, self.metrics,
                                        c.retry_after_s)
        self.limits = UsageLimits(self.guard.client, c.redis_prefix, c.usage_limits_refresh_s)
        self.limits.start()
        self.limiter = RateLimiter(self.guard, c.redis_prefix)
        retention = Retention(c.idempotency_ttl_s, c.idempotency_error_ttl_s, c.idempotency_max_body_bytes,
                              c.idempotency_tenant_budget_bytes)
        self.idempotency = IdempotencyStore(self.guard, c.redis_prefix, self.metrics, retention, c.idempotency_lock_s)
        self.replays = ReplayMemory(self.guard, c.redis_prefix)
        policy = await self.guard.eviction_policy()
        if policy not in (None, "noeviction"):
            log.warning("Redis evicts keys (maxmemory-policy %s): rate limits, replay memory and idempotency "
                        "records can be lost when it fills; give the gateway a Redis with noeviction (ADR 5)", policy)
        # What start-up built lives as long as the process: keep it out of every full collection.
        # Scanning it paused the loop 40-50 ms about once a second under batch load (ADR 2).
        gc.freeze()
        log.info("gateway ready: topic %s, %d webhook source(s)", c.topics.events, len(self.sources))
        try:
            yield
        finally:
            await self.limits.stop()
            left = producer.close()
            if left:
                log.error("shutdown: %d message(s) still undelivered after the flush", left)
            else:
                log.info("gateway stopped: producer flushed, nothing undelivered")
            await self.guard.close()
            await self._pool.close()
            await self._key_pool.close()

    async def principal(self, authorization: str, scope: str, route: str, client: str) -> Principal:
        """The key's principal; the tenant of every write comes from here and nowhere else.

        A token not in the cache costs a database query, so those lookups are rate-limited per address."""
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Problem(401, "Unauthorized", "send Authorization: Bearer <api key>",
                          headers={"WWW-Authenticate": "Bearer"})
        if not self.keys.cached(secret.strip())[0]:
            await self.limited(route, "key_lookups", client, self.lookup_limit)
        try:
            principal = await self.keys.authenticate(secret.strip())
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError) as exc:
            log.warning("key lookup failed: %s", exc)
            raise Problem(503, "Service unavailable", "API keys cannot be checked right now",
                          headers={"Retry-After": str(self.config.retry_after_s)}) from None
        if principal is None:
            raise Problem(401, "Unauthorized", "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        if scope not in principal.scopes:
            raise Problem(403, "Forbidden", f"this API key lacks the scope {scope}", required_scope=scope)
        return principal

    async def tenant(self, request: Request, scope: str) -> str:
        """For product routes (`tally.edge.products.Edge`): the key's tenant, checked and rate-limited like a write,
        holding one of the tenant's read slots until the route answered."""
        return (await self.key(request, scope)).tenant

    async def key(self, request: Request, scope: str) -> Principal:
        """As `tenant`, with the key's id and scopes."""
        client = request.client.host if request.client else "unknown"
        route = route_label(request.scope)
        principal = await self.principal(request.headers.get("authorization", ""), scope, route, client)
        await self.limited(route, "reads", principal.key_id, self.key_limit)
        _no_nul(request)
        await self.reads.take(request.scope, principal.tenant)
        return principal

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the pool exists once the app started"
        return self._pool

    async def limited(self, route: str, policy: str, subject: str, limit: Limit) -> Decision:
        decision = await self.limiter.check(policy, subject, limit)
        if not decision.allowed:
            self.metrics.rate_limited.labels(route).inc()
            raise Problem(429, "Too many requests", f"rate limit of {policy} exceeded; retry after "
                          f"{decision.retry_after_s} s", headers=decision.headers)
        return decision

    async def write(self, request: Request, route: str, policy: str, scope: str, max_bytes: int,
                    handler: Handler) -> Response:
        """The shared pipeline of the authenticated write routes."""
        client = request.client.host if request.client else "unknown"
        principal = await self.principal(request.headers.get("authorization", ""), scope, route, client)
        decision = await self.limited(route, policy, principal.key_id, self.key_limit)
        try:
            raw_key = request.headers.get(IDEMPOTENCY_HEADER)
            key = parse_key(raw_key) if raw_key is not None else None
            body = await read_body(request, max_bytes, self.config.body_timeout_s)
            if key is None:
                response = await handler(request, principal, body)
            else:
                fp = fingerprint(request.method, route, request.headers, body)
                response = await self.idempotency.run(principal.tenant, route, key, fp,
                                                      lambda: handler(request, principal, body))
        except Problem as problem:
            self.count_rejection(route, problem)
            response = problem.response()
        response.headers.update(decision.headers)
        return response

    def within_limits(self, tenant: str, event: dict, now: datetime) -> None:
        """Raise the usage-limit problem for an event past a hard limit (`tally.ingest.limits`)."""
        problem = self.limits.refused(tenant, event, now)
        if problem is not None:
            raise problem

    def items_within_limits(self, tenant: str, items: list[batch.Item], now: datetime) -> None:
        """A batch's events past a hard limit become rejected items; the others go on."""
        for item in items:
            if item.event is not None:
                problem = self.limits.refused(tenant, item.event, now)
                if problem is not None:
                    item.event, item.problem = None, problem

    def count_rejection(self, route: str, problem: Problem) -> None:
        """A refused request counts once; a batch without a valid item was counted item by item already."""
        refused = problem.status in (400, 413, 415) or problem.type == limits.PROBLEM_TYPE
        if refused and "results" not in problem.extensions:
            self.metrics.rejected.labels(route, problem.reason()).inc()

    async def post_event(self, request: Request) -> Response:
        return await self.write(request, "/v1/events", "events", "events:write", self.config.max_event_bytes,
                                self._event)

    async def _event(self, request: Request, principal: Principal, body: bytes) -> Response:
        now = utcnow()
        event = events.parse_single(request.headers, media_type(request), body, now, self.config.max_future_s)
        self.within_limits(principal.tenant, event, now)
        await self.publisher.publish_one(event, principal.tenant, now)
        self.metrics.accepted.labels("/v1/events").inc()
        return _json({"id": event["id"], "status": "accepted"}, 202)

    async def post_batch(self, request: Request) -> Response:
        return await self.write(request, "/v1/events/batch", "batch", "events:write", self.config.max_batch_bytes,
                                self._batch)

    async def _batch(self, request: Request, principal: Principal, body: bytes) -> Response:
        media = media_type(request)
        if media not in batch.BATCH_TYPES:
            raise unsupported(media, batch.BATCH_TYPES)
        now = utcnow()
        items = batch.check_events(parse_json(body), self.config.max_batch_items, now, self.config.max_future_s,
                                   values.Hazards.of(body))
        self.items_within_limits(principal.tenant, items, now)
        outcome = await self.publish_items("/v1/events/batch", items, principal, now)
        return _outcome(outcome)

    async def post_logs(self, request: Request) -> Response:
        return await self.write(request, "/v1/logs", "logs", "logs:write", self.config.max_batch_bytes, self._logs)

    async def _logs(self, request: Request, principal: Principal, body: bytes) -> Response:
        media = media_type(request)
        if media not in LOG_MEDIA:
            raise unsupported(media, LOG_MEDIA)
        if media == otlp.PROTOBUF:
            return await self._otlp_logs(media, otlp.decode_protobuf(body), principal, ids_in_base64=True)
        records = logs.split_body(media, body, self.config.max_batch_items)
        if len(records) == 1 and otlp.is_otlp(media, records[0]):
            return await self._otlp_logs(media, records[0], principal, ids_in_base64=False)
        now = utcnow()
        items = self._log_items(batch.check_items(records, self.config.max_batch_items, "a log request"), now,
                                values.Hazards.of(body))
        return _outcome(await self.publish_items("/v1/logs", items, principal, now))

    async def _otlp_logs(self, media: str, document: dict, principal: Principal, *, ids_in_base64: bool) -> Response:
        """OTLP's answer: 200 with partial success for refused records; 503 (retried by exporters) when
        Kafka did not take them all, since an exporter cannot re-send a part of its request."""
        now = utcnow()
        records = batch.check_items(otlp.records(document, ids_in_base64=ids_in_base64), self.config.max_batch_items,
                                    "an OTLP request")
        items = self._log_items(records, now, values.UNKNOWN)
        try:
            outcome = await self.publish_items("/v1/logs", items, principal, now)
            body = outcome.body
        except Problem as problem:
            if problem.status != 400:
                raise
            body = problem.body()
        if body.get("failed"):
            raise Problem(503, "Service unavailable", f"Kafka did not take {body['failed']} of the log records",
                          headers={"Retry-After": str(self.config.retry_after_s)})
        reasons = [f"record {r['index']}: " + ("; ".join(f"{e['field']}: {e['message']}" for e in r["problem"].get("errors", []))
                                             or r["problem"].get("detail", ""))
                   for r in body.get("results", []) if r["status"] == "rejected"]
        payload, content_type = otlp.answer(media, len(reasons), "; ".join(reasons[:3]))
        return Response(payload, 200, media_type=content_type)

    def _log_items(self, records: list, now: datetime, hazards: values.Hazards) -> list[batch.Item]:
        limit = now + timedelta(seconds=self.config.max_future_s)
        items = []
        for record in records:
            try:
                items.append(batch.Item(event=fields(logs.to_event(record, limit, hazards))))
            except Problem as problem:
                items.append(batch.Item(problem=problem))
        return items

    async def publish_items(self, route: str, items: list[batch.Item], principal: Principal,
                            now: datetime) -> batch.Outcome:
        """Publish a batch's valid items and count them; the outcome holds one result per item."""
        for item in items:
            if item.problem is not None:
                self.metrics.rejected.labels(route, item.problem.reason()).inc()
        outcome = await batch.publish_items(items, principal.tenant, now, self.publisher)
        self.metrics.accepted.labels(route).inc(outcome.accepted)
        return outcome

    async def post_webhook(self, request: Request) -> Response:
        route = "/v1/webhooks/{source}"
        name = request.path_params["source"]
        source = self.sources.get(name)
        client = request.client.host if request.client else "unknown"
        bucket = f"{name if source is not None else '(unknown)'}:{client}"
        decision = await self.limited(route, "webhooks", bucket, self.webhook_limit)
        if source is None:
            raise Problem(404, "Unknown webhook source", f"no webhook source named {name!r} is configured",
                          headers=decision.headers)
        body = await read_body(request, self.config.max_webhook_bytes, self.config.body_timeout_s)
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
                return _json({"id": seen.decode(), "status": "already accepted"}, 200,
                             {**decision.headers, "Idempotent-Replayed": "true"})
            raise Problem(409, "Replayed webhook", "this signed message is still being accepted; retry shortly",
                          reason="replay", headers={**decision.headers, "Retry-After": "1"})
        now = utcnow()
        try:
            event = webhooks.to_event(source, signed, media_type(request), body, now)
            await self.publisher.publish_one(fields(event), source.tenant, now)
        except BaseException:
            await self.replays.forget(key)
            raise
        await self.replays.accepted(key, event.id)
        self.metrics.accepted.labels(route).inc()
        return _json({"id": event.id, "status": "accepted"}, 202, decision.headers)

    async def healthz(self, _request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(self, _request: Request) -> Response:
        """Kafka must answer; Redis too, unless the policy lets traffic through without it.

        One probe at a time, its answer shared for a second: a flood of probes costs no thread each."""
        if self._ready is None or self._ready[0] <= time.monotonic():
            probe = self._probe if self._probe is not None and not self._probe.done() else None
            if probe is None:
                probe = self._probe = asyncio.ensure_future(asyncio.gather(
                    asyncio.to_thread(self.publisher.producer.reachable, self.config.topics.events, 2.0),
                    self.guard.ping()))
            kafka, redis = await asyncio.shield(probe)
            self._ready = (time.monotonic() + 1.0, kafka, redis)
        _, kafka, redis = self._ready
        ready = kafka and (redis or self.config.redis_failure_policy == "open")
        body = {"status": "ready" if ready else "unavailable", "kafka": "up" if kafka else "down",
                "redis": "up" if redis else f"down (policy {self.config.redis_failure_policy})"}
        return _json(body, 200 if ready else 503)

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
    assert isinstance(exc, Problem)
    return exc.response()


async def _http_error(_request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405, as problem+json like every other error."""
    assert isinstance(exc, HTTPException)
    return Problem(exc.status_code, exc.detail, headers=dict(exc.headers or {})).response()


async def _read_cancelled(_request: Request, _exc: Exception) -> Response:
    """A product read past the statement timeout (ADR 81): the database is busy or the query too broad."""
    return Problem(503, "Service unavailable", "the read took too long and was cancelled; narrow it or retry",
                   headers={"Retry-After": "5"}).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return Response(orjson.dumps({"type": "about:blank", "title": "Internal Server Error", "status": 500}),
                    500, media_type=PROBLEM_TYPE)


def create_app(config: GatewayConfig, products: Sequence[Product] = ()) -> ASGIApp:
    """The Starlette app behind the plain-ASGI intake routes (`tally.ingest.asgi_intake`), with each product's routes."""
    gateway = Gateway(config, products)
    routes = one_per_path([
        Route("/v1/events", gateway.post_event, methods=["POST"]),
        Route("/v1/events/batch", gateway.post_batch, methods=["POST"]),
        Route("/v1/logs", gateway.post_logs, methods=["POST"]),
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
    return AsgiIntake(app, gateway)
