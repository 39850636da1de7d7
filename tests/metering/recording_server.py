"""A local HTTP endpoint that records JSON posts (a Slack incoming-webhook double); `/fail` answers 500."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import orjson

from tests.support import http_server


@dataclass
class Recorder:
    url: str = ""
    received: list[tuple[str, Any]] = field(default_factory=list)


@contextmanager
def recording_server() -> Iterator[Recorder]:
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server's name
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            recorder.received.append((self.path, orjson.loads(body)))
            status = 500 if self.path == "/fail" else 200
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_args: object) -> None:
            pass

    with http_server(Handler) as recorder.url:
        yield recorder
