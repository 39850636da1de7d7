"""A local recording stand-in for Stripe's meter events endpoint: what stripe-mock cannot show
(the same identifier re-sent, failures, the breaker) is visible here."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs

import orjson

from tests.support import http_server


@dataclass
class Sent:
    identifier: str
    idempotency_key: str | None
    event_name: str
    customer: str
    value: str
    timestamp: int


@dataclass
class StripeDouble:
    url: str = ""
    received: list[Sent] = field(default_factory=list)
    failing: bool = False

    def for_customer(self, customer: str) -> list[Sent]:
        return [s for s in self.received if s.customer == customer]


@contextmanager
def stripe_double() -> Iterator[StripeDouble]:
    double = StripeDouble()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
            form = {k: v[0] for k, v in parse_qs(body).items()}
            sent = Sent(form.get("identifier", ""), self.headers.get("Idempotency-Key"), form.get("event_name", ""),
                        form.get("payload[stripe_customer_id]", ""), form.get("payload[value]", ""),
                        int(form.get("timestamp", 0)))
            double.received.append(sent)
            if double.failing:
                self._answer(503, {"error": {"type": "api_error", "message": "the double is failing"}})
                return
            self._answer(200, {"object": "billing.meter_event", "created": int(time.time()), "livemode": False,
                               "event_name": sent.event_name, "identifier": sent.identifier,
                               "payload": {"stripe_customer_id": sent.customer, "value": sent.value},
                               "timestamp": sent.timestamp})

        def _answer(self, status: int, body: dict) -> None:
            raw = orjson.dumps(body)
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *_args: object) -> None:
            pass

    with http_server(Handler) as double.url:
        yield double
