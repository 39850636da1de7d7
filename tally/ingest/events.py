"""Turning request bodies into validated CloudEvents: structured mode, binary mode (ce-* headers), time bounds."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote

from pydantic import ValidationError

from tally.edge import values
from tally.edge.body import parse_json, unsupported
from tally.ingest.precheck import plain_event
from tally.edge.problems import Problem, validation_errors
from tally.ingest.publish import Event, fields
from tally.schemas.envelope import EVENT_FIELDS, LOG_EVENT_TYPE, MAX_BYTES, RESERVED_SOURCE_PREFIXES, CloudEvent

STRUCTURED = ("application/cloudevents+json", "application/json")
EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
ATTRIBUTES = frozenset(EVENT_FIELDS)


def invalid(errors: list[dict[str, str]], detail: str = "the event is not a valid CloudEvent") -> Problem:
    return Problem(400, "Invalid event", detail, errors=errors)


def validate(obj: Any, now: datetime, max_future_s: float) -> CloudEvent:
    """A CloudEvent from parsed JSON, or a Problem naming the fields that are wrong."""
    if not isinstance(obj, dict):
        raise invalid([{"field": "(body)", "message": "a CloudEvent is a JSON object"}])
    try:
        event = CloudEvent.model_validate(obj)
    except ValidationError as exc:
        raise invalid(validation_errors(exc)) from None
    if event.time is not None:
        if event.time > now + timedelta(seconds=max_future_s):
            raise invalid([{"field": "time", "message": f"more than {max_future_s:g} s in the future"}])
        if event.time < EARLIEST:
            raise invalid([{"field": "time", "message": "before 1970-01-01T00:00:00Z"}])
    return event


def _attributes(obj: dict[str, Any]) -> list[dict[str, str]]:
    """Attributes the envelope would drop: refused, so a 202 never means data was lost."""
    unknown = obj.keys() - ATTRIBUTES
    if not unknown:
        return []
    return [{"field": name, "message": "binary data is accepted in binary mode only (a body with ce-* headers)"
             if name == "data_base64" else "not supported here (extension attributes are not kept)"}
            for name in sorted(unknown)]


def _bounds(event: Event) -> list[dict[str, str]]:
    """Key attributes within their limit in UTF-8 bytes, and none of the gateway's own namespaces."""
    errors = []
    for name, limit in MAX_BYTES.items():
        value = event.get(name)
        if value is not None and not value.isascii() and len(value.encode()) > limit:
            errors.append({"field": name, "message": f"longer than {limit} bytes in UTF-8"})
    if event["source"].startswith(RESERVED_SOURCE_PREFIXES):
        errors.append({"field": "source", "message": f"the prefixes {', '.join(RESERVED_SOURCE_PREFIXES)} are "
                                                    "reserved for the gateway's logs and webhooks routes"})
    if (reserved := reserved_type(event["type"])) is not None:
        errors.append({"field": "type", "message": reserved})
    return errors


def reserved_type(event_type: str) -> str | None:
    """Why `event_type` may not be sent here, if it is the log type: log records come only through the logs
    routes, which hold a record's own rules (service, level, message), and log search reads them by type."""
    return f"{LOG_EVENT_TYPE} is reserved for /v1/logs" if event_type == LOG_EVENT_TYPE else None


def check(obj: Any, now: datetime, max_future_s: float, hazards: values.Hazards = values.UNKNOWN) -> Event:
    """The event's attributes: the quick check for plainly valid events, the model for the rest."""
    event = plain_event(obj, now, max_future_s)
    if event is None:
        event = fields(validate(obj, now, max_future_s))
    errors = _attributes(obj) + _bounds(event)
    if errors:
        raise invalid(errors)
    values.check(obj, hazards, "(event)")
    return event


def is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def from_binary(headers: Mapping[str, str], media: str, body: bytes) -> dict[str, Any]:
    """CloudEvents HTTP binary mode: attributes in percent-encoded ce-* headers, the body is `data`."""
    pairs = [(name[3:], unquote(value)) for name, value in headers.items() if name.startswith("ce-")]
    attributes: dict[str, Any] = dict(pairs)
    if len(attributes) < len(pairs):
        repeated = sorted({name for name, _ in pairs if sum(1 for other, _ in pairs if other == name) > 1})
        raise invalid([{"field": f"ce-{name}", "message": "sent more than once"} for name in repeated])
    if not body:
        data = None
    elif is_json(media):
        data = parse_json(body, "the event data")
    elif media.startswith("text/"):
        try:
            data = body.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid([{"field": "data", "message": "text data must be UTF-8"}]) from None
    else:
        raise unsupported(media, ("application/json", "application/*+json", "text/*"))
    attributes["data"] = data
    attributes["datacontenttype"] = headers.get("content-type") or None
    return attributes


def is_structured(media: str, headers: Mapping[str, str]) -> bool:
    return media == "application/cloudevents+json" or (media == "application/json" and "ce-specversion" not in headers)


def parse_single(headers: Mapping[str, str], media: str, body: bytes, now: datetime, max_future_s: float) -> Event:
    """One event in whichever mode the request uses; binary mode is chosen by a ce-specversion header."""
    hazards = values.Hazards.of(body)
    if is_structured(media, headers):
        return check(parse_json(body), now, max_future_s, hazards)
    if "ce-specversion" in headers:
        return check(from_binary(headers, media, body), now, max_future_s, hazards)
    raise unsupported(media, STRUCTURED + ("any type with ce-* headers (binary mode)",))
