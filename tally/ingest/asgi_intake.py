"""The two busiest intake routes as plain ASGI, in front of the Starlette app (ADR 2 foresaw this).

POST /v1/events (structured mode) and POST /v1/events/batch without an Idempotency-Key are most of
the traffic; here they skip Starlette's routing, Request object, exception middleware and the
metrics middleware's send wrapper. The pipeline and its answers are the same object's the Starlette
routes call (`tally.ingest.intake`, ADR 121); this adapter only picks the requests, builds the `Call`,
sends the `Answer` and counts the request as the middleware would. Every other request, including
binary mode and Idempotency-Key requests, goes to the Starlette app.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Receive, Scope, Send

from tally.edge.answers import Answer, problem_answer
from tally.edge.body import media_type
from tally.ingest import events
from tally.ingest.intake import Call, Intake, WriteRoute
from tally.ingest.metrics import Metrics

WANTED = {b"authorization", b"content-type", b"content-length", b"idempotency-key", b"ce-specversion"}


def _headers(scope: Scope) -> dict[str, str]:
    """The few request headers the plain-ASGI routes read (the first of each, as Starlette's `get`)."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in WANTED:
            found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found


async def _send(send: Send, answer: Answer) -> None:
    headers = [(b"content-length", str(len(answer.body)).encode()), (b"content-type", answer.media_type.encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


class AsgiIntake:
    def __init__(self, app: ASGIApp, intake: Intake, metrics: Metrics) -> None:
        self.app = app
        self.intake = intake
        self.metrics = metrics

    def _route(self, scope: Scope) -> tuple[WriteRoute, dict[str, str]] | None:
        """The write route this adapter serves for the request, with its headers; None: Starlette's."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path = scope["path"]
        if path not in (self.intake.events.path, self.intake.batch.path):
            return None
        headers = _headers(scope)
        if "idempotency-key" in headers:
            return None
        if path == self.intake.batch.path:
            return self.intake.batch, headers
        return (self.intake.events, headers) if events.is_structured(media_type(headers), headers) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        picked = self._route(scope)
        if picked is None:
            await self.app(scope, receive, send)
            return
        route, headers = picked
        start = time.perf_counter()
        status = 500
        try:
            client = scope["client"][0] if scope.get("client") else "unknown"
            try:
                answer = await self.intake.write(route, Call(headers, receive, client))
            except Exception as exc:  # noqa: BLE001 - every error becomes an answer here, a 500 logged for a bug
                answer = problem_answer(exc, f"POST {route.path}")
            status = answer.status
            await _send(send, answer)
        finally:
            self.metrics.observe(route.path, status, time.perf_counter() - start)
