"""How a product package (query, usage, ...) adds routes to the gateway without the gateway importing it.

`tally gateway` hands `create_app` the products to serve; each gets an `Edge`: the gateway's key
check (scope and rate limit included), its database pool and Redis, so a product's handlers read
the tenant from the key exactly as the intake routes do and never from the request.
"""

from __future__ import annotations

from typing import Any, Protocol

import asyncpg
from starlette.requests import Request
from starlette.routing import BaseRoute

from ingest.auth import Principal


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
