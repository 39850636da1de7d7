"""A local stand-in for Stripe's Billing Meter Events API that enforces Stripe's documented rules, where
stripe-mock only checks shapes (docs/adr/0065 quotes the rules):

- `payload[value]` takes whole numbers only (a fraction gets 400); a negative one is accepted;
- an `identifier` is unique per account within a rolling window (24 h): a second event with it inside the
  window gets 400, after it the double has forgotten it and counts the event again;
- an `Idempotency-Key` replays its first answer for 24 h (other parameters: 400);
- `timestamp` within the past 35 days and at most 5 minutes ahead;
- an event for a finished billing period counts on that period's invoice only while the invoice is in
  its finalisation grace (1 h unless set); after that it is accepted but invoiced nowhere (`late`);
- a meter event adjustment cancels an event only within 24 h of Stripe receiving it;
- event summaries per meter, customer and minute-aligned time range;
- everything is kept per `Stripe-Account` header: one account never sees another's events, and an
  account the platform is not connected to gets 403.

The double's clock is settable (`advance`), so a test can let 24 h pass in a moment.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import orjson

from tests.support import DoubleHandler, http_server

DAY = 24 * 3600
WHOLE = re.compile(r"^-?[0-9]+$")


@dataclass
class Sent:
    """One POST to /v1/billing/meter_events, answered or not."""

    identifier: str
    idempotency_key: str | None
    event_name: str
    customer: str
    value: str
    timestamp: int
    account: str | None = None


@dataclass
class Event:
    """A meter event Stripe accepted."""

    account: str | None
    identifier: str
    event_name: str
    customer: str
    value: Decimal
    timestamp: int
    received_at: float
    late: bool = False  # its period's invoice was finalised when it arrived: invoiced nowhere
    cancelled: bool = False


@dataclass
class StripeDouble:
    url: str = ""
    received: list[Sent] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    failing: bool = False
    delay_s: float = 0.0  # every answer waits this long (two senders at once)
    invoice_grace_s: int = 3600
    # (account, customer) -> Stripe's billing periods [(start, end)], to know which invoices are finalised
    periods: dict[tuple[str | None, str], list[tuple[datetime, datetime]]] = field(default_factory=dict)
    connected: set[str] | None = None  # accounts the platform may act for (None: any); others get 403
    offset_s: float = 0.0
    _idempotency: dict[tuple[str | None, str], tuple[float, bytes, int, dict]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.time() + self.offset_s

    def advance(self, seconds: float) -> None:
        """Let time pass for Stripe (identifier and idempotency windows, cancel window, finalisation)."""
        self.offset_s += seconds

    def for_customer(self, customer: str) -> list[Sent]:
        return [s for s in self.received if s.customer == customer]

    def accepted(self, account: str | None = None, customer: str | None = None) -> list[Event]:
        return [e for e in self.events if not e.cancelled and (customer is None or e.customer == customer)
                and (account is None or e.account == account)]

    def invoiced(self, account: str | None, customer: str, start: datetime, end: datetime) -> Decimal:
        """What the invoice of [start, end) holds: accepted, not cancelled, not late events stamped inside
        (account None: under any account)."""
        return sum((e.value for e in self.accepted(account, customer)
                    if not e.late and start.timestamp() <= e.timestamp < end.timestamp()), Decimal(0))

    def late(self) -> list[Event]:
        return [e for e in self.events if e.late and not e.cancelled]

    def summary(self, account: str | None, event_name: str, customer: str, start: int, end: int) -> Decimal:
        return sum((e.value for e in self.events if e.account == account and e.event_name == event_name
                    and e.customer == customer and not e.cancelled and start <= e.timestamp < end), Decimal(0))

    # -- the API ---------------------------------------------------------------------------------

    def meter_event(self, account: str | None, form: dict[str, str]) -> tuple[int, dict]:
        now = self.now()
        value, identifier = form.get("payload[value]", ""), form.get("identifier", "")
        name, customer = form.get("event_name", ""), form.get("payload[stripe_customer_id]", "")
        if not name or len(name) > 100:
            return _error(400, "event_name", "event_name is required, at most 100 characters")
        if not customer:
            return _error(400, "payload[stripe_customer_id]", "the payload needs stripe_customer_id")
        if not WHOLE.match(value):
            return _error(400, "payload[value]", f"The value in the event payload must be a whole number. "
                                                 f"Received {value!r}.")
        if not identifier or len(identifier) > 100:
            return _error(400, "identifier", "identifier: 1 to 100 characters")
        timestamp = int(form.get("timestamp") or now)
        if timestamp < now - 35 * DAY or timestamp > now + 300:
            return _error(400, "timestamp", "timestamp must be within the past 35 calendar days or up to 5 "
                                            "minutes in the future")
        if any(e.account == account and e.identifier == identifier and now - e.received_at < DAY
               for e in self.events):
            return _error(400, "identifier", f"An event with identifier {identifier} already exists")
        late = any(start.timestamp() <= timestamp < end.timestamp() and now > end.timestamp() + self.invoice_grace_s
                   for start, end in self.periods.get((account, customer), []))
        self.events.append(Event(account, identifier, name, customer, Decimal(value), timestamp, now, late))
        return 200, {"object": "billing.meter_event", "created": int(now), "livemode": False, "event_name": name,
                     "identifier": identifier, "payload": {"stripe_customer_id": customer, "value": value},
                     "timestamp": timestamp}

    def adjustment(self, account: str | None, form: dict[str, str]) -> tuple[int, dict]:
        if form.get("type") != "cancel":
            return _error(400, "type", "type must be cancel")
        identifier, name = form.get("cancel[identifier]", ""), form.get("event_name", "")
        found = [e for e in self.events if e.account == account and e.identifier == identifier
                 and e.event_name == name]
        if not found:
            return _error(400, "cancel[identifier]", f"No meter event with identifier {identifier}")
        if self.now() - found[-1].received_at > DAY:
            return _error(400, "cancel[identifier]", "You can only cancel events within 24 hours of Stripe "
                                                     "receiving them")
        found[-1].cancelled = True
        return 200, {"object": "billing.meter_event_adjustment", "livemode": False, "status": "complete",
                     "event_name": name, "type": "cancel", "cancel": {"identifier": identifier}}

    def meters(self, account: str | None) -> tuple[int, dict]:
        names = sorted({e.event_name for e in self.events if e.account == account})
        return 200, {"object": "list", "has_more": False, "url": "/v1/billing/meters",
                     "data": [{"object": "billing.meter", "id": f"mtr_{n}", "event_name": n, "status": "active"}
                              for n in names]}

    def summaries(self, account: str | None, meter: str, query: dict[str, str]) -> tuple[int, dict]:
        try:
            start, end = int(query["start_time"]), int(query["end_time"])
        except (KeyError, ValueError):
            return _error(400, "start_time", "customer, start_time and end_time are required")
        if start % 60 or end % 60:
            return _error(400, "start_time", "start_time and end_time must be aligned with minute boundaries")
        value = self.summary(account, meter.removeprefix("mtr_"), query.get("customer", ""), start, end)
        return 200, {"object": "list", "has_more": False, "url": f"/v1/billing/meters/{meter}/event_summaries",
                     "data": [{"object": "billing.meter_event_summary", "id": f"mtrusg_{start}", "livemode": False,
                               "meter": meter, "start_time": start, "end_time": end,
                               "aggregated_value": float(value)}]}


def _error(status: int, param: str, message: str) -> tuple[int, dict]:
    return status, {"error": {"type": "invalid_request_error", "param": param, "message": message}}


@contextmanager
def stripe_double(**options: object) -> Iterator[StripeDouble]:
    double = StripeDouble(**options)  # type: ignore[arg-type]

    class Handler(DoubleHandler):
        def do_GET(self) -> None:  # http.server's name
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            account = self.headers.get("Stripe-Account")
            with double.lock:
                if parts.path == "/v1/billing/meters":
                    self._answer(*double.meters(account))
                elif m := re.fullmatch(r"/v1/billing/meters/([^/]+)/event_summaries", parts.path):
                    self._answer(*double.summaries(account, m[1], query))
                else:
                    self._answer(*_error(404, "path", f"no route {parts.path}"))

        def do_POST(self) -> None:  # http.server's name
            body = self.body().decode()
            form = {k: v[0] for k, v in parse_qs(body).items()}
            account, key = self.headers.get("Stripe-Account"), self.headers.get("Idempotency-Key")
            path = urlsplit(self.path).path
            if double.delay_s:
                time.sleep(double.delay_s)
            with double.lock:
                if path == "/v1/billing/meter_events":
                    double.received.append(Sent(form.get("identifier", ""), key, form.get("event_name", ""),
                                                form.get("payload[stripe_customer_id]", ""),
                                                form.get("payload[value]", ""), int(form.get("timestamp", 0)), account))
                status, answer = self._handle(path, account, key, form)
            self._answer(status, answer)

        def _handle(self, path: str, account: str | None, key: str | None, form: dict) -> tuple[int, dict]:
            if not self.headers.get("Authorization"):
                return _error(401, "authorization", "no API key provided")
            if double.connected is not None and account not in double.connected:
                return 403, {"error": {"type": "invalid_request_error", "message": "The provided key does not have "
                                       f"access to account '{account}' (or that account does not exist)"}}
            if double.failing:
                return 503, {"error": {"type": "api_error", "message": "the double is failing"}}
            if key is not None and (account, key) in double._idempotency:
                at, raw, status, answer = double._idempotency[(account, key)]
                if double.now() - at < DAY:
                    if raw != orjson.dumps(form, option=orjson.OPT_SORT_KEYS):
                        return _error(400, "idempotency_key", "Keys for idempotent requests can only be used "
                                                              "with the same parameters they were first used with")
                    return status, answer
            if path == "/v1/billing/meter_events":
                status, answer = double.meter_event(account, form)
            elif path == "/v1/billing/meter_event_adjustments":
                status, answer = double.adjustment(account, form)
            else:
                return _error(404, "path", f"no route {path}")
            if key is not None and status < 500:
                double._idempotency[(account, key)] = (double.now(), orjson.dumps(form, option=orjson.OPT_SORT_KEYS),
                                                       status, answer)
            return status, answer

        def _answer(self, status: int, body: dict) -> None:
            self.answer(status, orjson.dumps(body), {"content-type": "application/json"})

    with http_server(Handler) as double.url:
        yield double
