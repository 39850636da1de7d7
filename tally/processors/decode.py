"""Decode an events-topic message without building a pydantic model per message.

`tally.schemas.envelope.Envelope` stays the contract. This module checks the same rules by hand on the
shape the gateway writes (orjson, RFC 3339 times with an offset) and hands everything it is not
sure about to `Envelope.from_bytes`, so the verdict and the dead-letter reason never differ from
the model's: the fast path may only say "valid, with these values", never "invalid".
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

import orjson

from tally.processors.storable import check_integers
from tally.schemas.envelope import (MAX_CONTENT_TYPE, MAX_DATASCHEMA, MAX_ID, MAX_SOURCE, MAX_SUBJECT, MAX_TENANT,
                                    MAX_TYPE, Envelope)
from tally.sinks.base import Event

# pydantic-core's JSON parser refuses nesting deeper than this; a message with more brackets than that
# in all goes to the model, which gives the verdict (tests/processor/test_processor_decode.py pins it).
MODEL_DEPTH = 200

# Times the fast path parses itself; any other form goes to the model (which accepts more forms).
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})")
# orjson turns integers beyond 64 bits into floats where the model keeps them exact: leave any run of
# 19 digits to it. One pass maps digits to b"0", brackets that open a container to b"[" and everything
# else to b" ": then the run of digits and the bracket count are plain searches.
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
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(doc) is not dict:
        return None
    get = doc.get
    specversion, id_, source, type_, tenant = get("specversion", "1.0"), get("id"), get("source"), get("type"), get("tenant")
    subject, content_type, dataschema = get("subject"), get("datacontenttype"), get("dataschema")
    if not (
        specversion == "1.0" and type(specversion) is str
        and type(id_) is str and 0 < len(id_) <= MAX_ID
        and type(source) is str and 0 < len(source) <= MAX_SOURCE
        and type(type_) is str and 0 < len(type_) <= MAX_TYPE
        and type(tenant) is str and 0 < len(tenant) <= MAX_TENANT
        and (subject is None or (type(subject) is str and len(subject) <= MAX_SUBJECT))
        and (content_type is None or (type(content_type) is str and len(content_type) <= MAX_CONTENT_TYPE))
        and (dataschema is None or (type(dataschema) is str and len(dataschema) <= MAX_DATASCHEMA))
    ):
        return None
    time = _time(get("time"))
    received_at = _time(get("received_at"))
    if time is None or received_at is None:
        return None
    return Event(tenant, source, id_, type_, subject, time, received_at, get("data"))


_parsed: dict[str, datetime] = {}  # a batch's events share received_at and often their times


def _time(value: Any) -> datetime | None:
    if type(value) is not str:
        return None
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
