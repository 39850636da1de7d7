"""The gateway's ASGI application: routes and lifecycle."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg
import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingest.auth import KeyStore, Principal
from ingest.config import GatewayConfig
from ingest.problems import Problem, validation_errors
from ingest.producer import EventProducer, Unavailable, producer_config
from schemas.envelope import CONTENT_TYPE, SCHEMA_VERSION, CloudEvent, Envelope, utcnow


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.producer: EventProducer | None = None
        self.keys: KeyStore | None = None
        self._pool: asyncpg.Pool | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self._pool = await asyncpg.create_pool(self.config.database_url, min_size=1, max_size=4)
        self.keys = KeyStore(self._pool, self.config.key_cache_ttl_s)
        self.producer = EventProducer(producer_config(self.config.kafka_bootstrap))
        try:
            yield
        finally:
            self.producer.close()
            await self._pool.close()

    async def principal(self, request: Request) -> Principal:
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise Problem(401, "Unauthorized", "send Authorization: Bearer <api key>",
                          headers={"WWW-Authenticate": "Bearer"})
        assert self.keys is not None
        principal = await self.keys.authenticate(secret.strip())
        if principal is None:
            raise Problem(401, "Unauthorized", "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        return principal

    async def post_event(self, request: Request) -> Response:
        principal = await self.principal(request)
        body = await request.body()
        try:
            event = CloudEvent.model_validate_json(body)
        except ValidationError as exc:
            raise Problem(400, "Invalid event", "the body is not a valid CloudEvent",
                          errors=validation_errors(exc)) from exc
        envelope = Envelope.accept(event, principal.tenant, utcnow())
        await self.publish([envelope])
        return _json({"id": envelope.id, "status": "accepted"}, 202)

    async def publish(self, envelopes: list[Envelope]) -> None:
        assert self.producer is not None
        messages = [(e.key(), e.to_bytes(), self.headers(e)) for e in envelopes]
        try:
            errors = await self.producer.send_many(self.config.topics.events, messages)
        except Unavailable as exc:
            raise self.unavailable(str(exc)) from exc
        failed = [err for err in errors if err is not None]
        if failed:
            raise self.unavailable(str(failed[0]))

    def unavailable(self, reason: str) -> Problem:
        return Problem(503, "Event store unavailable", f"Kafka did not acknowledge the event: {reason}",
                       headers={"Retry-After": "5"})

    @staticmethod
    def headers(envelope: Envelope) -> list[tuple[str, bytes]]:
        return [
            ("tenant", envelope.tenant.encode()),
            ("content-type", CONTENT_TYPE.encode()),
            ("schema-version", SCHEMA_VERSION.encode()),
            ("received-at", envelope.received_at.isoformat().encode()),
        ]

    async def healthz(self, _request: Request) -> Response:
        return _json({"status": "ok"})


async def _problem(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response()


def create_app(config: GatewayConfig) -> Starlette:
    gateway = Gateway(config)
    app = Starlette(
        routes=[
            Route("/v1/events", gateway.post_event, methods=["POST"]),
            Route("/healthz", gateway.healthz, methods=["GET"]),
        ],
        exception_handlers={Problem: _problem},
        lifespan=gateway.lifespan,
    )
    app.state.gateway = gateway
    return app
