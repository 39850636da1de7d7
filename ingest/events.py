"""Turning request bodies into validated CloudEvents: structured mode, binary mode (ce-* headers), time bounds."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote

from pydantic import ValidationError

from ingest.body import parse_json, unsupported
from ingest.fastcheck import plain_event
from ingest.problems import Problem, validation_errors
from ingest.publish import Event, fields
from schemas.envelope import CloudEvent

STRUCTURED = ("application/cloudevents+json", "application/json")
EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)


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


def check(obj: Any, now: datetime, max_future_s: float) -> Event:
    """The event's attributes: the quick check for plainly valid events, the model for the rest."""
    event = plain_event(obj, now, max_future_s)
    return event if event is not None else fields(validate(obj, now, max_future_s))


def is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def from_binary(headers: Mapping[str, str], media: str, body: bytes) -> dict[str, Any]:
    """CloudEvents HTTP binary mode: attributes in percent-encoded ce-* headers, the body is `data`."""
    attributes: dict[str, Any] = {
        name[3:]: unquote(value) for name, value in headers.items() if name.startswith("ce-")
    }
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
    if is_structured(media, headers):
        return check(parse_json(body), now, max_future_s)
    if "ce-specversion" in headers:
        return check(from_binary(headers, media, body), now, max_future_s)
    raise unsupported(media, STRUCTURED + ("any type with ce-* headers (binary mode)",))
