"""Decode an events-topic message without building a pydantic model per message.

`tally.schemas.envelope.Envelope` stays the contract. A msgspec struct holds the same rules on the shape
the gateway writes (RFC 3339 times with an offset) and hands everything it is not sure about to
`Envelope.from_bytes`, so the verdict and the dead-letter reason never differ from the model's: the
fast path may only say "valid, with these values", never "invalid" (docs/adr/0158).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from tally.processors.storable import check_integers
from tally.schemas.envelope import MAX_ID, MAX_SOURCE, MAX_SUBJECT, MAX_TENANT, MAX_TYPE, Envelope
from tally.sinks.base import Event

MAX_CONTENT_TYPE = 128
MAX_DATASCHEMA = 512
# pydantic-core's JSON parser refuses nesting deeper than this; a message with more brackets than that
# in all goes to the model, which gives the verdict (tests/processor/test_processor_decode.py pins it).
MODEL_DEPTH = 200


class _Wire(msgspec.Struct, gc=False):
    """The envelope's rules that msgspec holds exactly; lengths are in characters, as the model's.

    Times stay text: msgspec rounds fractions beyond microseconds where the model truncates them.
    """

    id: Annotated[str, Meta(min_length=1, max_length=MAX_ID)]
    source: Annotated[str, Meta(min_length=1, max_length=MAX_SOURCE)]
    type: Annotated[str, Meta(min_length=1, max_length=MAX_TYPE)]
    tenant: Annotated[str, Meta(min_length=1, max_length=MAX_TENANT)]
    time: str
    received_at: str
    specversion: Literal["1.0"] = "1.0"
    subject: Annotated[str, Meta(max_length=MAX_SUBJECT)] | None = None
    datacontenttype: Annotated[str, Meta(max_length=MAX_CONTENT_TYPE)] | None = None
    dataschema: Annotated[str, Meta(max_length=MAX_DATASCHEMA)] | None = None
    data: Any = None


_wire = msgspec.json.Decoder(_Wire).decode

# Times the fast path parses itself; any other form goes to the model (which accepts more forms).
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})")
# One pass maps digits to b"0", brackets that open a container to b"[", everything else to b" ": then a
# run of 19 digits (perhaps an integer beyond 64 bits, which storage cannot write: the model's path says
# so) and the bracket count are plain searches, and the fast path never walks `data`.
_SCAN = bytes(0x30 if 0x30 <= b <= 0x39 else 0x5B if b in b"[{" else 0x20 for b in range(256))
_LONG_DIGITS = b"0" * 19


def decode(raw: bytes) -> Event:
    """The event in `raw`, or the model's ValidationError for the message (as Envelope.from_bytes raises).

    Only the model keeps integers beyond 64 bits, which storage cannot write: those raise Unstorable.
    """
    event = _fast(raw)
    if event is None:
        event = from_envelope(Envelope.from_bytes(raw))
        check_integers(event.data)
    return event


def from_envelope(envelope: Envelope) -> Event:
    """An Event from the model; times without an offset are taken as UTC, as everywhere in the processor."""
    return Event(envelope.tenant, envelope.source, envelope.id, envelope.type, envelope.subject,
                 _utc_if_naive(envelope.time), _utc_if_naive(envelope.received_at), envelope.data)


def _fast(raw: bytes) -> Event | None:
    """The event if `raw` has the common, unambiguous shape; None to let the model decide."""
    scan = raw.translate(_SCAN)
    # JSON nested deeper than MODEL_DEPTH takes more than twice as many bytes, so short messages skip the count
    if _LONG_DIGITS in scan or (len(raw) > 2 * MODEL_DEPTH and scan.count(b"[") > MODEL_DEPTH):
        return None
    if not raw.isascii():
        try:
            raw.decode()  # msgspec does not check the UTF-8 of members it skips; the model does
        except UnicodeDecodeError:
            return None
    try:
        wire = _wire(raw)
    except msgspec.DecodeError:
        return None
    time = _time(wire.time)
    received_at = _time(wire.received_at)
    if time is None or received_at is None:
        return None
    return Event(wire.tenant, wire.source, wire.id, wire.type, wire.subject, time, received_at, wire.data)


_parsed: dict[str, datetime] = {}  # a batch's events share received_at and often their times


def _time(value: str) -> datetime | None:
    moment = _parsed.get(value)
    if moment is not None:
        return moment
    if not _TIME.fullmatch(value):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if len(_parsed) >= 4096:
        _parsed.clear()
    _parsed[value] = moment
    return moment


def _utc_if_naive(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
