"""The read API: GET /v1/logs, /v1/events and their /stats, served by the gateway as a product.

The tenant always comes from the API key (scopes `logs:read`, `events:read`); a page's `next` link
carries the resolved time range and a cursor signed for this tenant and these filters.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tally.edge.products import Edge
from tally.query import search, stats
from tally.query.cache import AnswerCache
from tally.query.cursor import Cursors
from tally.query.filters import EventQuery, EventStatsQuery, LogQuery, LogStatsQuery, Page, parameters, parse

Search = Callable[[str, Any], search.Where]
Shape = Callable[[Any], dict[str, Any]]


class QueryProduct:
    def __init__(self, cursor_secret: str, cache: AnswerCache, max_points: int = 10_000) -> None:
        # Without a configured secret, cursors are good for this gateway process only. The secret is shared with
        # the alerts API's cursors: sign with a key of the query API's own, derived from it.
        secret = cursor_secret.encode() or secrets.token_bytes(32)
        self._cursors = Cursors(hmac.new(secret, b"tally query cursors", hashlib.sha256).digest())
        self._cache = cache
        self._max_points = max_points

    def routes(self, edge: Edge) -> list[BaseRoute]:
        async def logs(request: Request) -> Response:
            return await self._page(edge, request, "logs:read", LogQuery, search.log_filters, search.log_record, "records")

        async def events(request: Request) -> Response:
            return await self._page(edge, request, "events:read", EventQuery, search.event_filters, search.event_record,
                                    "events")

        async def log_stats(request: Request) -> Response:
            return await self._stats(edge, request, "logs:read", LogStatsQuery, stats.log_stats)

        async def event_stats(request: Request) -> Response:
            return await self._stats(edge, request, "events:read", EventStatsQuery, stats.event_stats)

        return [Route("/v1/logs", logs, methods=["GET"]), Route("/v1/events", events, methods=["GET"]),
                Route("/v1/logs/stats", log_stats, methods=["GET"]), Route("/v1/events/stats", event_stats, methods=["GET"])]

    async def _page(self, edge: Edge, request: Request, scope: str, model: type[Page], filters: Search, shape: Shape,
                    name: str) -> Response:
        tenant = await edge.tenant(request, scope)
        query = parse(model, request.query_params)
        # Signed with the route too: a cursor of /v1/events is not one of /v1/logs with the same range.
        signed = f"{request.url.path} {_fingerprint(query, exclude={'cursor', 'limit'})}"
        after = self._cursors.decode(tenant, signed, query.cursor) if query.cursor else None
        async with edge.pool.acquire() as conn:
            rows = await search.page(conn, filters(tenant, query), query, after)
        more = len(rows) > query.limit
        rows = rows[:query.limit]
        body: dict[str, Any] = {name: [shape(row) for row in rows], "next": None}
        if more:
            last = rows[-1]
            cursor = self._cursors.encode(tenant, signed, (last["time"], last["source"], last["id"]))
            params = {k: v for k, v in _query_params(query).items() if k != "cursor"}
            body["next"] = f"{request.url.path}?{urlencode({**params, 'cursor': cursor})}"
        return Response(orjson.dumps(body, option=orjson.OPT_UTC_Z), 200, media_type="application/json")

    async def _stats(self, edge: Edge, request: Request, scope: str, model: type[BaseModel],
                     compute: Callable[..., Awaitable[list[dict[str, Any]]]]) -> Response:
        tenant = await edge.tenant(request, scope)
        query = parse(model, request.query_params)

        async def fresh() -> bytes:
            async with edge.pool.acquire() as conn:
                series = await compute(conn, tenant, query, self._max_points)
            return orjson.dumps({"series": series, "start": query.start, "end": query.end,
                                 "as_of": datetime.now(timezone.utc)}, option=orjson.OPT_UTC_Z)

        # Keyed by the request as sent: "the last hour" is one answer for the cache's few seconds.
        answer, cached = await self._cache.get_or_compute(tenant, f"{request.url.path}?{sorted(request.query_params.multi_items())}",
                                                          fresh)
        headers = {"Cache-Control": f"max-age={int(self._cache.ttl_s)}", "X-Tally-Cache": "hit" if cached else "miss"}
        return Response(answer, 200, headers, media_type="application/json")

    async def close(self) -> None:
        """The answer cache's Redis client."""
        await self._cache.close()

    def openapi_paths(self) -> dict[str, Any]:
        def get(summary: str, model: type[BaseModel], scope: str) -> dict[str, Any]:
            return {"get": {"summary": summary, "security": [{"apiKey": []}], "parameters": parameters(model),
                            "responses": {"200": {"description": f"needs the scope {scope}",
                                                  "content": {"application/json": {"schema": {"type": "object"}}}},
                                          **{str(s): {"description": d, "content": {"application/problem+json": {
                                              "schema": {"$ref": "#/components/schemas/Problem"}}}}
                                             for s, d in ((400, "invalid query or cursor"), (401, "no valid key"),
                                                          (403, "the key lacks the scope"), (429, "rate limited"),
                                                          (503, "keys cannot be checked, or the read took too long"))
                                             }}}}

        return {
            "/v1/logs": get("Search log records (newest first), a page at a time", LogQuery, "logs:read"),
            "/v1/events": get("Search events (newest first), a page at a time", EventQuery, "events:read"),
            "/v1/logs/stats": get("Log counts per service and level per minute or hour, from counter windows",
                                  LogStatsQuery, "logs:read"),
            "/v1/events/stats": get("Event counts per type and subject per hour or day, from counter windows",
                                    EventStatsQuery, "events:read"),
        }


def _query_params(query: BaseModel) -> dict[str, str]:
    values = query.model_dump(mode="json", exclude_none=True)
    return {k: str(v) for k, v in values.items()}


def _fingerprint(query: BaseModel, exclude: Collection[str] = ()) -> str:
    return orjson.dumps({k: v for k, v in _query_params(query).items() if k not in exclude},
                        option=orjson.OPT_SORT_KEYS).decode()
