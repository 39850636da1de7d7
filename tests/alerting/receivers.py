"""A local receiver for alert deliveries: a Slack incoming-webhook double and Standard Webhooks endpoints.

Each path answers 200 unless told otherwise: `answers[path]` is consumed one answer per request, `slow[path]`
holds each request that long, and a path in `secrets` verifies the signature with the library and answers 401
when it does not hold.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from standardwebhooks import Webhook, WebhookVerificationError

from tests.support import DoubleHandler, http_server


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()
    verified: bool | None = None

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    url: str = ""
    received: list[Received] = field(default_factory=list)
    answers: dict[str, list[tuple[int, dict[str, str], bytes]]] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    slow: dict[str, float] = field(default_factory=dict)
    released: threading.Event = field(default_factory=threading.Event)

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    def ids(self, path: str) -> list[str]:
        return [r.headers["webhook-id"] for r in self.at(path)]


@contextmanager
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    lock = threading.Lock()

    class Handler(DoubleHandler):
        def do_POST(self) -> None:  # http.server's name
            body = self.body()
            got = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
            with lock:
                state.received.append(got)
                scripted = state.answers.get(self.path)
                status, headers, text = scripted.pop(0) if scripted else (200, {}, b"ok")
            if self.path in state.slow:
                state.released.wait(state.slow[self.path])
            if self.path in state.secrets:
                try:
                    Webhook(state.secrets[self.path]).verify(body, got.headers)
                    got.verified = True
                except WebhookVerificationError:
                    got.verified = False
                    status, headers, text = 401, {}, b"signature does not verify"
            self.answer(status, text, headers)

    with http_server(Handler) as state.url:
        try:
            yield state
        finally:
            state.released.set()  # a held request answers, so the server can stop
