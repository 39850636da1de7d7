"""What step 2 can always write: the bounds a decoded event must keep so that no message that passed
step 1 can fail in PostgreSQL or in the meters for reasons of its own.

The gateway keeps these too, but the events topic is a contract any producer can write to (a tool, a
replay from outside), so the processor checks them again and dead-letters what breaks them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from tally.schemas.envelope import MAX_ID_BYTES, MAX_SOURCE_BYTES, MAX_SUBJECT_BYTES, MAX_TENANT_BYTES, over_bytes

# Every window of an event time in this range starts and ends inside Python's datetime range.
EARLIEST_TIME = datetime(1, 1, 2, tzinfo=timezone.utc)
LATEST_TIME = datetime(9999, 12, 1, tzinfo=timezone.utc)
# orjson writes integers in [-2^63, 2^64); `data` is stored through it.
_MIN_INT = -(2**63)
_MAX_INT = 2**64 - 1


class Unstorable(ValueError):
    """An event that PostgreSQL or the meters could never take; the message says which rule it breaks."""


def check_bounds(event: Any) -> None:
    """Raise Unstorable if a key attribute is too long in bytes or a time is outside the windows' range.

    Decoding already bounds these attributes in characters, and in ASCII those limits are within the byte
    limits, so only text with other characters is measured.
    """
    subject = event.subject
    if not (event.tenant.isascii() and event.source.isascii() and event.id.isascii()
            and (subject is None or subject.isascii())):
        for name, value, limit in (("tenant", event.tenant, MAX_TENANT_BYTES), ("source", event.source, MAX_SOURCE_BYTES),
                                   ("id", event.id, MAX_ID_BYTES), ("subject", subject, MAX_SUBJECT_BYTES)):
            if value is not None and over_bytes(value, limit):
                raise Unstorable(f"{name} is longer than {limit} bytes in UTF-8")
    try:
        in_range = EARLIEST_TIME <= event.time < LATEST_TIME and EARLIEST_TIME <= event.received_at < LATEST_TIME
    except OverflowError:
        in_range = False
    if not in_range:
        raise Unstorable(f"time or received_at is outside [{EARLIEST_TIME.isoformat()}, {LATEST_TIME.isoformat()})")


def check_integers(data: Any) -> None:
    """Raise Unstorable if `data` holds an integer that orjson cannot write (beyond 64 bits)."""
    stack = [data]
    while stack:
        node = stack.pop()
        if type(node) is int:
            if not _MIN_INT <= node <= _MAX_INT:
                raise Unstorable("data holds an integer beyond 64 bits")
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def check_no_nul(event: Any) -> None:
    """Raise Unstorable if a string of the event holds a NUL character, which PostgreSQL text cannot store."""
    stack: list[Any] = [event.tenant, event.source, event.id, event.type, event.subject, event.data]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                raise Unstorable("a NUL character (\\u0000) cannot be stored in PostgreSQL")
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
