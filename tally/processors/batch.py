"""Step 1 of a batch: decode and validate every message, evaluate meters, set poison aside.

A message that can never succeed becomes a dead letter here; everything else becomes a Record,
ready for the one PostgreSQL transaction of step 2.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from confluent_kafka import Message, TopicPartition
from pydantic import ValidationError

from tally.meters.live import LiveMeters
from tally.meters.meterset import MeterError, MeterSet
from tally.processors.decode import decode
from tally.processors.dlq import dead_letter
from tally.processors.storable import Unstorable, check_bounds, check_no_nul
from tally.schemas.deadletter import DeadLetter
from tally.sinks.base import Record


@dataclass
class Batch:
    """One batch's validated records and dead letters, with the messages they came from (kept in
    consume order, so an abandoned batch can be read again before anything consumed after it)."""

    messages: list[Message] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    late: int = 0
    consumed: int = 0
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    revision: int = -1  # of the meter catalog it was validated under (tally.meters.live)

    def commit_offsets(self) -> list[TopicPartition]:
        """One past the highest offset handled, per partition."""
        return [TopicPartition(t, p, o + 1) for (t, p), o in self.offsets.items()]


class Validator:
    """Turns consumed messages into a Batch under the configured meters, accepted types and horizon."""

    def __init__(self, meters: MeterSet | LiveMeters, accept_types: list[str], late_horizon: timedelta) -> None:
        self.meters = meters
        self._accept = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in accept_types) or "(?!)").match
        self.late_horizon = late_horizon
        self._verdicts: dict[str, bool] = {}

    def batch(self, messages: list[Message], now: datetime, into: Batch | None = None) -> Batch:
        """Validate `messages` into a new Batch, or append them to `into` (a batch validated in chunks)."""
        out = into if into is not None else Batch()
        out.revision = self.revision
        out.messages.extend(messages)
        offsets = out.offsets
        records = out.records
        accepted = self._accepted
        check = self.meters.check
        horizon = self.late_horizon
        for msg in messages:
            partition, offset = msg.partition(), msg.offset()
            key = (msg.topic(), partition)
            if offsets.get(key, -1) < offset:
                offsets[key] = offset
            raw = msg.value()
            if raw is None:
                out.dead_letters.append(dead_letter(msg, "decode", "EmptyMessage", "message has no value", now))
                continue
            try:
                event = decode(raw)
                check_bounds(event)
                if b"\\u0000" in raw:  # the escape, or a literal backslash before "u0000": only the first is a NUL
                    check_no_nul(event)
            except ValidationError as exc:
                invalid_json = any(err["type"] == "json_invalid" for err in exc.errors())
                error_class = "InvalidJSON" if invalid_json else "SchemaMismatch"
                out.dead_letters.append(dead_letter(msg, "decode", error_class, _summary(exc), now))
                continue
            except Unstorable as exc:
                out.dead_letters.append(dead_letter(msg, "decode", "UnstorableValue", str(exc), now))
                continue
            if not accepted(event.type):
                out.dead_letters.append(
                    dead_letter(msg, "validate", "UnknownEventType", f"event type {event.type!r} is not accepted", now)
                )
                continue
            try:
                check(event)
            except MeterError as exc:
                out.dead_letters.append(dead_letter(msg, "meter", "MeterError", str(exc), now))
                continue
            counted = event.received_at - event.time <= horizon
            if not counted:
                out.late += 1
            records.append(Record(event, partition, offset, counted))
        out.consumed += len(messages)
        return out

    @property
    def live(self) -> LiveMeters:
        """The meters, taken up live from the catalog (the processor's; tests may give a fixed MeterSet)."""
        if not isinstance(self.meters, LiveMeters):
            raise TypeError("meters fixed at start are not live")
        return self.meters

    @property
    def revision(self) -> int:
        """The meter catalog revision the checks are made under (-1: meters fixed at start)."""
        return self.meters.revision if isinstance(self.meters, LiveMeters) else -1

    def again(self, batch: Batch, now: datetime) -> None:
        """Validate a batch's messages again, under meters that changed since it was validated."""
        fresh = self.batch(batch.messages, now)
        batch.records, batch.dead_letters, batch.late, batch.revision = (fresh.records, fresh.dead_letters, fresh.late,
                                                                         fresh.revision)

    def _accepted(self, event_type: str) -> bool:
        """The accept globs' verdict, memoised: a stream carries few distinct types."""
        verdict = self._verdicts.get(event_type)
        if verdict is None:
            if len(self._verdicts) > 10_000:
                self._verdicts.clear()
            verdict = self._verdicts[event_type] = self._accept(event_type) is not None
        return verdict


def _summary(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
