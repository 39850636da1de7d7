"""The ceilings of Python HTTP on this machine: two endpoints that parse the body and answer 202.

`raw` is a bare ASGI callable with orjson; `starlette` is the gateway's framework with nothing
else. Served by uvicorn exactly as `tally gateway` is:
    python -m uvicorn benchmarks.bare:raw --port N
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Scope = dict[str, Any]
Message = dict[str, Any]
_ACCEPTED = orjson.dumps({"status": "accepted"})
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_ACCEPTED)).encode())]


async def raw(scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]) -> None:
    if scope["type"] != "http":
        return
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    orjson.loads(b"".join(chunks) or b"null")
    await send({"type": "http.response.start", "status": 202, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _ACCEPTED})


async def _accept(request: Request) -> Response:
    orjson.loads(await request.body() or b"null")
    return Response(_ACCEPTED, 202, media_type="application/json")


starlette = Starlette(routes=[Route("/{path:path}", _accept, methods=["POST"])])
