"""How a product package (query, usage, ...) adds routes to the gateway without the gateway importing it.

`tally gateway` hands `create_app` the products to serve; each gets an `Edge`: the gateway's key
check (scope and rate limit included), its database pool and Redis, so a product's handlers read
the tenant from the key exactly as the intake routes do and never from the request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route



@dataclass(frozen=True)
class Principal:
    """An API key as the gateway knows it: the tenant of every request comes from here."""

    key_id: str
    tenant: str
    scopes: frozenset[str]


class Edge(Protocol):
    async def tenant(self, request: Request, scope: str) -> str:
        """The tenant of the request's API key, which must hold `scope`; raises the 401/403/429 problem."""
        ...

    async def key(self, request: Request, scope: str) -> Principal:
        """As `tenant`, with the key's id and scopes (a link records the key that minted it)."""
        ...

    @property
    def pool(self) -> asyncpg.Pool: ...


class Product(Protocol):
    def routes(self, edge: Edge) -> list[BaseRoute]: ...

    def openapi_paths(self) -> dict[str, Any]:
        """OpenAPI path items for the routes, merged into the gateway's document."""
        ...

    async def close(self) -> None:
        """Stops what the product runs in the background on the gateway's loop: at shutdown, before the pools close."""
        ...


Endpoint = Callable[[Request], Awaitable[Response]]


def resource(path: str, item: str, *, listing: Endpoint, create: Endpoint, get: Endpoint, put: Endpoint,
             delete: Endpoint) -> list[BaseRoute]:
    """A collection and its items, as every product's resources are routed: GET and POST `path`, GET, PUT and
    DELETE `path/{item}`."""
    one = f"{path}/{{{item}}}"
    return [Route(path, listing, methods=["GET"]), Route(path, create, methods=["POST"]),
            Route(one, get, methods=["GET"]), Route(one, put, methods=["PUT"]), Route(one, delete, methods=["DELETE"])]


def one_per_path(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """The routes with those of one path merged into one that dispatches on the method: Starlette answers a
    405 from the first route of a path, so its `Allow` named that route's methods only."""
    merged: dict[str, dict[str, Any]] = {}
    out: list[BaseRoute | str] = []
    for route in routes:
        if not isinstance(route, Route) or not route.methods:
            out.append(route)
            continue
        if route.path not in merged:
            merged[route.path] = {}
            out.append(route.path)
        merged[route.path].update(dict.fromkeys(route.methods, route))
    return [_merged(item, merged[item]) if isinstance(item, str) else item for item in out]


def _merged(path: str, by_method: dict[str, Route]) -> Route:
    routes = list({id(route): route for route in by_method.values()}.values())
    if len(routes) == 1:
        return routes[0]

    async def dispatch(request: Request) -> Response:
        return await by_method[request.method].endpoint(request)

    return Route(path, dispatch, methods=list(by_method), name=routes[0].name)
