"""A local HTTP endpoint that records JSON posts (a Slack incoming-webhook double); `/fail` answers 500."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.support import DoubleHandler, http_server


@dataclass
class Recorder:
    url: str = ""
    received: list[tuple[str, Any]] = field(default_factory=list)


@contextmanager
def recording_server() -> Iterator[Recorder]:
    recorder = Recorder()

    class Handler(DoubleHandler):
        def do_POST(self) -> None:  # http.server's name
            recorder.received.append((self.path, orjson.loads(self.body())))
            self.answer(500 if self.path == "/fail" else 200, b"ok")

    with http_server(Handler) as recorder.url:
        yield recorder
