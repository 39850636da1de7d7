"""Log records from shippers (one, an array, or NDJSON lines) turned into events of the log type.

A record's id is its own when given; otherwise a hash of its content when it has a time (so a
shipper's retry deduplicates), else a random one (two identical timeless lines are two events).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import uuid
from typing import Any

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from tally.edge import values
from tally.edge.body import parse_json
from tally.ingest.events import EARLIEST, invalid
from tally.edge.problems import Problem, validation_errors
from tally.schemas.envelope import LOG_EVENT_TYPE, MAX_ID, CloudEvent

LINE = re.compile(rb"^[ \t\r]*\S[^\n]*", re.M)
MAX_SERVICE_BYTES = 128  # the service becomes the source "logs/<service>" and the subject
LOG_TYPES = ("application/json", "application/x-ndjson")
LEVELS = {
    "trace": "trace", "debug": "debug", "info": "info", "information": "info", "notice": "info",
    "warn": "warn", "warning": "warn", "error": "error", "err": "error",
    "fatal": "fatal", "critical": "fatal", "crit": "fatal", "emergency": "fatal", "alert": "fatal",
}


def _bounded(value: str, limit: int) -> str:
    if len(value.encode()) > limit:
        raise ValueError(f"longer than {limit} bytes in UTF-8")
    return value


class LogRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    service: str = Field(min_length=1, max_length=128)
    level: str = "info"
    message: str = Field(max_length=65536)
    time: AwareDatetime | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)
    trace_id: str | None = Field(None, pattern=r"^[0-9a-fA-F]{32}$")
    span_id: str | None = Field(None, pattern=r"^[0-9a-fA-F]{16}$")
    id: str | None = Field(None, min_length=1, max_length=MAX_ID)

    @field_validator("service")
    @classmethod
    def bounded_service(cls, value: str) -> str:
        """The service names the source and the subject, which are bounded in UTF-8 bytes."""
        return _bounded(value, MAX_SERVICE_BYTES)

    @field_validator("id")
    @classmethod
    def bounded_id(cls, value: str | None) -> str | None:
        """The id is the dedup id, bounded in UTF-8 bytes as the envelope's."""
        return None if value is None else _bounded(value, MAX_ID)

    @field_validator("level")
    @classmethod
    def known_level(cls, value: str) -> str:
        level = LEVELS.get(value.strip().lower())
        if level is None:
            raise ValueError(f"unknown level; use one of {', '.join(sorted(set(LEVELS.values())))}")
        return level


def split_body(media: str, body: bytes, max_items: int) -> list[Any]:
    """Records as parsed JSON values: NDJSON lines, or a JSON object or array.

    NDJSON stops after one line more than `max_items`, so a long body is refused before it is parsed.
    """
    if media == "application/x-ndjson":
        lines = list(itertools.islice((m.group() for m in LINE.finditer(body)), max_items + 1))
        if len(lines) > max_items:
            return lines
        return [parse_json(line, f"line {n + 1}") for n, line in enumerate(lines)]
    value = parse_json(body)
    return value if isinstance(value, list) else [value]


def record_id(record: LogRecord) -> str:
    if record.id:
        return record.id
    if record.time is None:
        return uuid.uuid4().hex
    content = record.model_dump(mode="json", exclude={"id"})
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def to_event(value: Any, now_limit: AwareDatetime, hazards: values.Hazards) -> CloudEvent:
    """One log record as a CloudEvent: source logs/<service>, subject the service, data the record."""
    if not isinstance(value, dict):
        raise Problem(400, "Invalid log record", "a log record is a JSON object",
                      errors=[{"field": "(record)", "message": "expected a JSON object"}])
    values.check(value, hazards, "(record)")
    try:
        record = LogRecord.model_validate(value)
    except ValidationError as exc:
        raise Problem(400, "Invalid log record", "the log record is not valid", errors=validation_errors(exc)) from None
    if record.time is not None and not EARLIEST <= record.time <= now_limit:
        raise invalid([{"field": "time", "message": "too far in the future or before 1970"}], "the log record is not valid")
    data = record.model_dump(mode="json", exclude={"id", "time"}, exclude_none=True)
    return CloudEvent.model_construct(specversion="1.0", id=record_id(record), source=f"logs/{record.service}",
                                      type=LOG_EVENT_TYPE, time=record.time, subject=record.service,
                                      datacontenttype="application/json", dataschema=None, data=data)
