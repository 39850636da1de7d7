"""The write pipeline of the intake routes: one object, called by both adapters (ADR 121).

The plain-ASGI front (`tally.ingest.asgi_intake`, ADR 2) and the Starlette routes (`tally.ingest.app`)
only translate a request into a `Call` and the `Answer` back; the order of the steps, the answers and
the counts of accepted and rejected events live here. Every write, in this order:

1. authorize: the API key's principal; the tenant of every write comes from here and nowhere else
2. rate limit per key and route
3. Idempotency-Key: with one, steps 4-8 run once per (tenant, route, key); a repeat gets the first answer
4. read the body within the route's byte limit (413, 408; 400 if the client goes away)
5. parse and validate
6. usage limits: an event past a hard limit is refused
7. publish, waiting for Kafka's ack
8. answer: 202 only after the ack, or the problem+json of whichever step refused
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
from starlette.types import Receive

from tally.edge import values
from tally.edge.answers import Answer, json_answer, problem_answer
from tally.edge.body import media_type, parse_json, read_body, unsupported
from tally.edge.problems import Problem
from tally.edge.products import Principal
from tally.ingest import batch, events, limits, logs, otlp
from tally.ingest.auth import KeyStore
from tally.ingest.config import GatewayConfig
from tally.ingest.idempotency import HEADER as IDEMPOTENCY_HEADER
from tally.ingest.idempotency import IdempotencyStore, fingerprint, parse_key
from tally.ingest.limits import UsageLimits
from tally.ingest.metrics import Metrics
from tally.ingest.publish import Publisher, fields
from tally.ingest.ratelimit import Decision, Limit, RateLimiter
from tally.schemas.envelope import utcnow

log = logging.getLogger("tally.gateway")

LOG_MEDIA = (*logs.LOG_TYPES, otlp.PROTOBUF)


@dataclass(frozen=True, slots=True)
class Call:
    """What the pipeline reads of a write request; each adapter builds one from its own request."""

    headers: Mapping[str, str]  # lower-case names; the first value of each
    receive: Receive
    client: str
    method: str = "POST"


Accept = Callable[[Mapping[str, str], Principal, bytes], Awaitable[Answer]]


@dataclass(frozen=True, slots=True)
class WriteRoute:
    path: str
    policy: str  # the rate limit's name
    scope: str
    max_bytes: int
    accept: Accept  # steps 5 to 8


class Intake:
    def __init__(self, config: GatewayConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.key_limit = Limit(config.rate_limit_per_s, config.rate_limit_burst)
        self.lookup_limit = Limit(config.key_lookup_rate_limit_per_s, config.key_lookup_rate_limit_burst)
        self.events = WriteRoute("/v1/events", "events", "events:write", config.max_event_bytes, self._event)
        self.batch = WriteRoute("/v1/events/batch", "batch", "events:write", config.max_batch_bytes, self._batch)
        self.logs = WriteRoute("/v1/logs", "logs", "logs:write", config.max_batch_bytes, self._logs)
        self._accepted = {r.path: metrics.accepted.labels(r.path) for r in (self.events, self.batch, self.logs)}
        self.keys: KeyStore
        self.limiter: RateLimiter
        self.idempotency: IdempotencyStore
        self.publisher: Publisher
        self.limits: UsageLimits

    def connect(self, keys: KeyStore, limiter: RateLimiter, idempotency: IdempotencyStore, publisher: Publisher,
                usage_limits: UsageLimits) -> None:
        """The clients the pipeline calls; the gateway's lifespan builds them, since they need the running loop."""
        self.keys, self.limiter, self.idempotency = keys, limiter, idempotency
        self.publisher, self.limits = publisher, usage_limits

    async def write(self, route: WriteRoute, call: Call) -> Answer:
        """Steps 1 to 8; a Problem of any step becomes its answer, any other exception is the adapter's 500."""
        try:
            # Step 1: authorize
            principal = await self.principal(call.headers.get("authorization", ""), route.scope, route.path,
                                             call.client)
            # Step 2: rate limit
            decision = await self.limited(route.path, route.policy, principal.key_id, self.key_limit)
        except Problem as problem:
            return problem_answer(problem)
        try:
            # Step 3: Idempotency-Key
            raw_key = call.headers.get(IDEMPOTENCY_HEADER)
            key = parse_key(raw_key) if raw_key is not None else None
            # Step 4: the body within its limit
            body = await read_body(call.receive, call.headers, route.max_bytes, self.config.body_timeout_s)
            if key is None:
                answer = await route.accept(call.headers, principal, body)
            else:
                fp = fingerprint(call.method, route.path, call.headers, body)
                answer = await self.idempotency.run(principal.tenant, route.path, key, fp,
                                                    lambda: route.accept(call.headers, principal, body))
        except Problem as problem:
            self.count_rejection(route.path, problem)
            answer = problem_answer(problem)
        answer.headers.update(decision.headers)
        return answer

    async def principal(self, authorization: str, scope: str, route: str, client: str) -> Principal:
        """The key's principal. A token not in the cache costs a database query, so those lookups are
        rate-limited per address."""
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Problem(401, "Unauthorized", "send Authorization: Bearer <api key>",
                          headers={"WWW-Authenticate": "Bearer"})
        token = secret.strip()
        found, principal = self.keys.cached(token)  # hashed once: a cached key costs no second digest
        if not found:
            await self.limited(route, "key_lookups", client, self.lookup_limit)
            try:
                principal = await self.keys.authenticate(token)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError) as exc:
                log.warning("key lookup failed: %s", exc)
                raise Problem(503, "Service unavailable", "API keys cannot be checked right now",
                              headers={"Retry-After": str(self.config.retry_after_s)}) from None
        if principal is None:
            raise Problem(401, "Unauthorized", "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        if scope not in principal.scopes:
            raise Problem(403, "Forbidden", f"this API key lacks the scope {scope}", required_scope=scope)
        return principal

    async def limited(self, route: str, policy: str, subject: str, limit: Limit) -> Decision:
        decision = await self.limiter.check(policy, subject, limit)
        if not decision.allowed:
            self.metrics.rate_limited.labels(route).inc()
            raise Problem(429, "Too many requests", f"rate limit of {policy} exceeded; retry after "
                          f"{decision.retry_after_s} s", headers=decision.headers)
        return decision

    def count_rejection(self, route: str, problem: Problem) -> None:
        """A refused request counts once; a batch without a valid item was counted item by item already."""
        refused = problem.status in (400, 413, 415) or problem.type == limits.PROBLEM_TYPE
        if refused and "results" not in problem.extensions:
            self.metrics.rejected.labels(route, problem.reason()).inc()

    async def _event(self, headers: Mapping[str, str], principal: Principal, body: bytes) -> Answer:
        now = utcnow()
        # Step 5: structured or binary mode, validated
        event = events.parse_single(headers, media_type(headers), body, now, self.config.max_future_s)
        # Step 6: usage limits
        problem = self.limits.refused(principal.tenant, event, now)
        if problem is not None:
            raise problem
        # Step 7: publish
        await self.publisher.publish_one(event, principal.tenant, now)
        self._accepted[self.events.path].inc()
        # Step 8: answer
        return json_answer({"id": event["id"], "status": "accepted"}, 202)

    async def _batch(self, headers: Mapping[str, str], principal: Principal, body: bytes) -> Answer:
        # Step 5: each item valid or with its own problem
        media = media_type(headers)
        if media not in batch.BATCH_TYPES:
            raise unsupported(media, batch.BATCH_TYPES)
        now = utcnow()
        items = batch.check_events(parse_json(body), self.config.max_batch_items, now, self.config.max_future_s,
                                   values.Hazards.of(body))
        # Step 6: events past a hard limit become rejected items; the others go on
        for item in items:
            if item.event is not None:
                problem = self.limits.refused(principal.tenant, item.event, now)
                if problem is not None:
                    item.event, item.problem = None, problem
        # Steps 7 and 8
        return _outcome(await self._publish_items(self.batch.path, items, principal, now))

    async def _logs(self, headers: Mapping[str, str], principal: Principal, body: bytes) -> Answer:
        """Logs have no usage limits (step 6); OTLP requests get OTLP's answers."""
        media = media_type(headers)
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
        return _outcome(await self._publish_items(self.logs.path, items, principal, now))

    async def _otlp_logs(self, media: str, document: dict, principal: Principal, *, ids_in_base64: bool) -> Answer:
        """OTLP's answer: 200 with partial success for refused records; 503 (retried by exporters) when
        Kafka did not take them all, since an exporter cannot re-send a part of its request."""
        now = utcnow()
        records = batch.check_items(otlp.records(document, ids_in_base64=ids_in_base64), self.config.max_batch_items,
                                    "an OTLP request")
        items = self._log_items(records, now, values.UNKNOWN)
        try:
            outcome = await self._publish_items(self.logs.path, items, principal, now)
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
        return Answer(200, payload, content_type)

    def _log_items(self, records: list, now: datetime, hazards: values.Hazards) -> list[batch.Item]:
        limit = now + timedelta(seconds=self.config.max_future_s)
        items = []
        for record in records:
            try:
                items.append(batch.Item(event=fields(logs.to_event(record, limit, hazards))))
            except Problem as problem:
                items.append(batch.Item(problem=problem))
        return items

    async def _publish_items(self, route: str, items: list[batch.Item], principal: Principal,
                             now: datetime) -> batch.Outcome:
        """Publish a batch's valid items and count them; the outcome holds one result per item."""
        for item in items:
            if item.problem is not None:
                self.metrics.rejected.labels(route, item.problem.reason()).inc()
        outcome = await batch.publish_items(items, principal.tenant, now, self.publisher)
        self._accepted[route].inc(outcome.accepted)
        return outcome


def _outcome(outcome: batch.Outcome) -> Answer:
    """A batch's answer; with items Kafka did not take it is not kept under its Idempotency-Key."""
    answer = json_answer(outcome.body, outcome.status)
    answer.keep = not outcome.failed
    return answer
