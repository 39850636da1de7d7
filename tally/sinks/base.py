"""The sink contract, after Kafka Connect's SinkTask and Quix Streams' BatchingSink.

A processor hands a sink a batch with `write`, then calls `flush`; when `flush` returns, what
was written is durable, and only then may the processor commit the batch's offsets. `flush`
returns what the sink found (the store: new events, duplicates, conflicts, poison) or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol, TypeVar

import orjson

from tally.schemas.envelope import Envelope

T_contra = TypeVar("T_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)


@dataclass(slots=True)
class Event:
    """The envelope's attributes without a pydantic model: what the processor decodes and reconciliation
    reads back."""

    tenant: str
    source: str
    id: str
    type: str
    subject: str | None
    time: datetime
    received_at: datetime
    data: Any


# The columns of `events` that `stored_event` reads back, in a select list.
EVENT_COLUMNS = "tenant, source, id, type, subject, time, received_at, data::text as data"


def stored_event(row: Any) -> Event:
    """A row of `events` (selected with EVENT_COLUMNS) as the Event the processor decoded."""
    return Event(row["tenant"], row["source"], row["id"], row["type"], row["subject"], row["time"], row["received_at"],
                 None if row["data"] is None else orjson.loads(row["data"]))


# The envelope attributes storage and meters read: an Envelope, or the lighter Event.
StoredEvent = Event | Envelope


class Record(NamedTuple):
    """An event and where it was read from, so storage can point back at the log (a tuple: one is
    built per message).

    `counted` is false for an event older than the late-event horizon: it is stored, not counted.
    `partition` and `offset` name one message of the events topic: storage maps the keys it claimed
    back to records by them (docs/adr/0112).
    """

    envelope: StoredEvent
    partition: int
    offset: int
    counted: bool = True


class Sink(Protocol[T_contra, R_co]):
    async def write(self, batch: T_contra) -> None: ...

    async def flush(self) -> R_co: ...
