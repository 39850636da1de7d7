"""Step 1 of a batch: decode and validate every message, evaluate meters, set poison aside.

A message that can never succeed becomes a dead letter here; everything else becomes a Record,
ready for the one PostgreSQL transaction of step 2.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from confluent_kafka import Message, TopicPartition
from pydantic import ValidationError

from processors.dlq import dead_letter
from processors.meters import MeterError, MeterSet
from schemas.deadletter import DeadLetter
from schemas.envelope import Envelope
from sinks.base import Record


@dataclass
class Batch:
    records: list[Record] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    late: int = 0
    consumed: int = 0
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    def commit_offsets(self) -> list[TopicPartition]:
        """One past the highest offset handled, per partition."""
        return [TopicPartition(t, p, o + 1) for (t, p), o in self.offsets.items()]


class Validator:
    """Turns consumed messages into a Batch under the configured meters, accepted types and horizon."""

    def __init__(self, meters: MeterSet, accept_types: list[str], late_horizon: timedelta) -> None:
        self.meters = meters
        self._accept = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in accept_types) or "(?!)").match
        self.late_horizon = late_horizon

    def batch(self, messages: list[Message], now: datetime) -> Batch:
        out = Batch()
        for msg in messages:
            out.consumed += 1
            key = (msg.topic(), msg.partition())
            out.offsets[key] = max(out.offsets.get(key, -1), msg.offset())
            raw = msg.value()
            if raw is None:
                out.dead_letters.append(dead_letter(msg, "decode", "EmptyMessage", "message has no value", now))
                continue
            if b"\\u0000" in raw:
                out.dead_letters.append(dead_letter(msg, "decode", "UnstorableValue",
                                                    "a NUL character (\\u0000) cannot be stored in PostgreSQL", now))
                continue
            try:
                envelope = _aware(Envelope.from_bytes(raw))
            except ValidationError as exc:
                invalid_json = any(err["type"] == "json_invalid" for err in exc.errors())
                error_class = "InvalidJSON" if invalid_json else "SchemaMismatch"
                out.dead_letters.append(dead_letter(msg, "decode", error_class, _summary(exc), now))
                continue
            if not self._accept(envelope.type):
                out.dead_letters.append(
                    dead_letter(msg, "validate", "UnknownEventType", f"event type {envelope.type!r} is not accepted", now)
                )
                continue
            try:
                self.meters.check(envelope)
            except MeterError as exc:
                out.dead_letters.append(dead_letter(msg, "meter", "MeterError", str(exc), now))
                continue
            counted = envelope.received_at - envelope.time <= self.late_horizon
            if not counted:
                out.late += 1
            out.records.append(Record(envelope, msg.partition(), msg.offset(), counted))
        return out


def _aware(envelope: Envelope) -> Envelope:
    """Times without an offset are taken as UTC, so windows and lateness never depend on the host's zone."""
    if envelope.time.tzinfo is not None and envelope.received_at.tzinfo is not None:
        return envelope
    return envelope.model_copy(update={
        "time": envelope.time if envelope.time.tzinfo else envelope.time.replace(tzinfo=timezone.utc),
        "received_at": envelope.received_at if envelope.received_at.tzinfo
        else envelope.received_at.replace(tzinfo=timezone.utc),
    })


def _summary(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
