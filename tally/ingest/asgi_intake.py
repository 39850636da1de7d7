"""The two busiest intake routes as plain ASGI, in front of the Starlette app (ADR 2 foresaw this).

POST /v1/events (structured mode) and POST /v1/events/batch without an Idempotency-Key are most of
the traffic; here they skip Starlette's routing, Request object, exception middleware and the
metrics middleware's send wrapper, and keep the same pipeline and answers: key, rate limit, body
within its limit, validation, Kafka's ack, then 202 (or the problem+json of whichever step refused).
Every other request, including binary mode and Idempotency-Key requests, goes to the Starlette app.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from tally.ingest import batch, events, values
from tally.edge.body import check_declared_length, parse_json, too_large, too_slow, unsupported
from tally.edge.problems import MEDIA_TYPE as PROBLEM_TYPE
from tally.edge.problems import Problem
from tally.schemas.envelope import utcnow

if TYPE_CHECKING:
    from tally.ingest.app import Gateway

log = logging.getLogger("tally.gateway")

EVENTS, BATCH = "/v1/events", "/v1/events/batch"
WANTED = {b"authorization", b"content-type", b"content-length", b"idempotency-key", b"ce-specversion"}
JSON = b"application/json"
SERVER_ERROR = orjson.dumps({"type": "about:blank", "title": "Internal Server Error", "status": 500})


def _headers(scope: Scope) -> dict[str, str]:
    """The few request headers the plain-ASGI routes read (the first of each, as Starlette's `get`)."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in WANTED:
            found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found


def _media(headers: dict[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _body(receive: Receive, headers: dict[str, str], limit: int, timeout_s: float) -> bytes:
    """As `tally.edge.body.read_body`: 413 as soon as the declared or the counted size passes the limit, 408 past
    the deadline."""
    check_declared_length(headers.get("content-length"), limit)
    try:
        async with asyncio.timeout(timeout_s):
            return await _receive(receive, limit)
    except TimeoutError:
        raise too_slow(timeout_s) from None


async def _receive(receive: Receive, limit: int) -> bytes:
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        body: bytes = message.get("body", b"")
        if len(body) > limit:
            raise too_large(limit)
        return body
    chunks: list[bytes] = []
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            raise Problem(400, "Client disconnected", "the request body was not received whole")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()


async def _send(send: Send, status: int, body: bytes, media: bytes, extra: dict[str, str]) -> None:
    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", media)]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AsgiIntake:
    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway
        metrics = gateway.metrics
        self._latency = {route: metrics.latency.labels(route) for route in (EVENTS, BATCH)}
        self._accepted = {route: metrics.accepted.labels(route) for route in (EVENTS, BATCH)}
        self._requests: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in (EVENTS, BATCH):
            headers = _headers(scope)
            if "idempotency-key" not in headers:
                media = _media(headers)
                route = scope["path"]
                if route == EVENTS and events.is_structured(media, headers):
                    await self._serve(route, scope, receive, send, headers, media)
                    return
                if route == BATCH:
                    await self._serve(route, scope, receive, send, headers, media)
                    return
        await self.app(scope, receive, send)

    async def _serve(self, route: str, scope: Scope, receive: Receive, send: Send, headers: dict[str, str],
                     media: str) -> None:
        start = time.perf_counter()
        status = 500
        try:
            try:
                client = scope["client"][0] if scope.get("client") else "unknown"
                answer = await self._answer(route, receive, headers, media, client)
            except Exception:
                log.exception("unhandled error on POST %s", route)
                answer = (500, SERVER_ERROR, PROBLEM_TYPE.encode(), {})
            status = answer[0]
            await _send(send, *answer)
        finally:
            self._latency[route].observe(time.perf_counter() - start)
            counter = self._requests.get((route, status))
            if counter is None:
                counter = self._requests[route, status] = self.gateway.metrics.requests.labels(route, str(status))
            counter.inc()

    async def _answer(self, route: str, receive: Receive, headers: dict[str, str], media: str,
                      client: str) -> tuple[int, bytes, bytes, dict[str, str]]:
        """The same steps as `Gateway.write`, in the same order; a Problem becomes its response."""
        gw, config = self.gateway, self.gateway.config
        try:
            principal = await gw.principal(headers.get("authorization", ""), "events:write", route, client)
            policy = "events" if route == EVENTS else "batch"
            decision = await gw.limited(route, policy, principal.key_id, gw.key_limit)
        except Problem as problem:
            return problem.status, orjson.dumps(problem.body()), PROBLEM_TYPE.encode(), problem.headers
        try:
            now = utcnow()
            if route == EVENTS:
                body = await _body(receive, headers, config.max_event_bytes, config.body_timeout_s)
                event = events.check(parse_json(body), now, config.max_future_s, values.Hazards.of(body))
                gw.within_limits(principal.tenant, event, now)
                await gw.publisher.publish_one(event, principal.tenant, now)
                self._accepted[EVENTS].inc()
                status, payload = 202, orjson.dumps({"id": event["id"], "status": "accepted"})
            else:
                body = await _body(receive, headers, config.max_batch_bytes, config.body_timeout_s)
                if media not in batch.BATCH_TYPES:
                    raise unsupported(media, batch.BATCH_TYPES)
                items = batch.check_events(parse_json(body), config.max_batch_items, now, config.max_future_s,
                                           values.Hazards.of(body))
                gw.items_within_limits(principal.tenant, items, now)
                outcome = await gw.publish_items(BATCH, items, principal, now)
                status, payload = outcome.status, orjson.dumps(outcome.body)
            return status, payload, JSON, decision.headers
        except Problem as problem:
            gw.count_rejection(route, problem)
            return (problem.status, orjson.dumps(problem.body()), PROBLEM_TYPE.encode(),
                    {**problem.headers, **decision.headers})
