"""The event envelope: CloudEvents 1.0 attributes as producers send them, plus what the gateway adds.

The dedup key is (tenant, source, id); the tenant comes from the API key, never from the body.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1"
CONTENT_TYPE = "application/cloudevents+json"
LOG_EVENT_TYPE = "tally.log"

# Lengths in characters (code points), as the model counts them: every check in characters (the gateway's
# and the processor's quick paths, the log records) uses these, so none can accept what the model refuses.
MAX_ID = 256
MAX_SOURCE = 512
MAX_TYPE = 256
MAX_SUBJECT = 256
MAX_TENANT = 128
MAX_CONTENT_TYPE = 128
MAX_DATASCHEMA = 512
# What the gateway accepts for the key attributes, in UTF-8 bytes: the same figures as the characters, so
# ASCII text meets both at once. The dedup and message keys are built from these, and PostgreSQL's btree
# entries are bounded in bytes. Tenants are checked where they are made (keys, webhook sources).
MAX_BYTES = {"tenant": MAX_TENANT, "source": MAX_SOURCE, "id": MAX_ID, "subject": MAX_SUBJECT, "type": MAX_TYPE}
MAX_NESTING = 64  # JSON containers inside an event; orjson encodes at most 254
MAX_MESSAGE_BYTES = 1_000_000  # librdkafka's message.max.bytes; the broker's default allows a little more
RESERVED_SOURCE_PREFIXES = ("logs/", "webhooks/")  # only the gateway's own routes make these

# What the processor can store, in UTF-8 bytes (at least what the gateway accepts): (tenant, source, id) is
# one btree entry of event_keys and the subject and group values go into the counters' key, and PostgreSQL
# refuses a btree entry over 2704 bytes (about 2,300 bytes is left for these three with room for the entry's
# overhead).
MAX_TENANT_BYTES = 256
MAX_SOURCE_BYTES = 1024
MAX_ID_BYTES = 1024
MAX_SUBJECT_BYTES = 512
MAX_GROUP_VALUE_BYTES = 512


def over_bytes(text: str, limit: int) -> bool:
    """Whether `text` is longer than `limit` bytes in UTF-8 (ASCII text is measured without encoding it)."""
    return len(text) > limit if text.isascii() else len(text.encode()) > limit


class CloudEvent(BaseModel):
    """A CloudEvent 1.0 in structured mode, as a producer posts it. `time` must carry its offset (RFC 3339)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    specversion: str = Field("1.0", pattern=r"^1\.0$")
    id: str = Field(min_length=1, max_length=MAX_ID)
    source: str = Field(min_length=1, max_length=MAX_SOURCE)
    type: str = Field(min_length=1, max_length=MAX_TYPE)
    time: AwareDatetime | None = None
    subject: str | None = Field(None, max_length=MAX_SUBJECT)
    datacontenttype: str | None = Field(None, max_length=MAX_CONTENT_TYPE)
    dataschema: str | None = Field(None, max_length=MAX_DATASCHEMA)
    data: Any = None


class Envelope(CloudEvent):
    """What travels on tally.events.v1: the producer's event, its tenant and when the gateway got it."""

    model_config = ConfigDict(extra="ignore")

    tenant: str = Field(min_length=1, max_length=MAX_TENANT)
    time: datetime
    received_at: datetime

    @classmethod
    def accept(cls, event: CloudEvent, tenant: str, received_at: datetime) -> "Envelope":
        """The event is validated already and the tenant comes from a key, so nothing is validated twice."""
        fields = {name: getattr(event, name) for name in CloudEvent.model_fields}
        fields["time"] = event.time or received_at
        return cls.model_construct(**fields, tenant=tenant, received_at=received_at)

    def key(self) -> bytes:
        """Kafka message key: tenant and subject, so one subject's events stay ordered."""
        return message_key(self.tenant, self.subject)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Envelope":
        return cls.model_validate_json(raw)


EVENT_FIELDS = ("specversion", "id", "source", "type", "time", "subject", "datacontenttype", "dataschema", "data")


def encode(event: dict[str, Any], tenant: str, received_at: datetime) -> bytes:
    """The bytes `Envelope.accept(...).to_bytes()` gives, from an already validated event's fields, without a model.

    `event` maps attribute names to validated values (`time` an aware datetime or None). The gateway's
    hot path uses this; tests hold it byte-equal to the model's output, which `from_bytes` reads.
    """
    get = event.get
    out: dict[str, Any] = {"specversion": get("specversion") or "1.0", "id": event["id"], "source": event["source"],
                           "type": event["type"], "time": get("time") or received_at}
    for name in EVENT_FIELDS[5:]:
        value = get(name)
        if value is not None:
            out[name] = value
    out["tenant"] = tenant
    out["received_at"] = received_at
    return orjson.dumps(out, option=orjson.OPT_UTC_Z)


class Content(Protocol):
    type: str
    subject: str | None
    time: datetime
    received_at: datetime
    data: Any


def content_digest(event: Content) -> bytes:
    """What makes two copies of one (tenant, source, id) the same event: type, subject, time and data.

    An exact re-send is a duplicate; a copy that differs in any of these is a conflict (docs/adr/0014).
    A `time` equal to `received_at` is the one the gateway filled in for a producer that sent none, so
    it is left out: a retry of such an event gets another receipt time but is the same event. Keys of
    `data` are sorted, so the order a producer's serialiser writes them in does not matter.
    """
    moment = None if event.time == event.received_at else (event.time - _EPOCH) // _MICROSECOND
    content = [event.type, event.subject, moment, event.data]
    try:
        canonical = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits, which orjson does not write
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.blake2b(canonical, digest_size=16).digest()


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def message_key(tenant: str, subject: str | None) -> bytes:
    """Kafka message key: tenant and subject, so one subject's events stay ordered (as `Envelope.key`)."""
    return f"{tenant}/{subject or ''}".encode()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
