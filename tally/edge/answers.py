"""What a route answers, before any framework sees it, and the one place an error becomes an answer.

The gateway's intake pipeline returns an `Answer`; the plain-ASGI adapter sends it as it is, Starlette
routes and exception handlers turn it into a `Response`. A Problem answers with its problem+json, any
other exception with a bare 500 (logged, never shown to the client).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import orjson
from starlette.responses import Response

from tally.edge.problems import MEDIA_TYPE as PROBLEM_TYPE
from tally.edge.problems import Problem

log = logging.getLogger("tally.gateway")

JSON = "application/json"
SERVER_ERROR = orjson.dumps({"type": "about:blank", "title": "Internal Server Error", "status": 500})


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes
    media_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    keep: bool = True  # False: the request had effects only in part, so it is not kept under its Idempotency-Key

    def response(self) -> Response:
        return Response(self.body, self.status, self.headers, self.media_type)


def json_answer(value: object, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, orjson.dumps(value), JSON, headers or {})


def problem_answer(exc: BaseException, where: str = "") -> Answer:
    """A Problem's problem+json with its status and headers; anything else is logged and answers 500."""
    if isinstance(exc, Problem):
        return Answer(exc.status, orjson.dumps(exc.body()), PROBLEM_TYPE, dict(exc.headers))
    log.error("unhandled error on %s", where or "a request", exc_info=exc)
    return Answer(500, SERVER_ERROR, PROBLEM_TYPE)
