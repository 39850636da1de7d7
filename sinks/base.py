"""The sink contract, after Kafka Connect's SinkTask and Quix Streams' BatchingSink.

A processor hands a sink a batch with `write`, then calls `flush`; when `flush` returns, what
was written is durable, and only then may the processor commit the batch's offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from schemas.envelope import Envelope

T_contra = TypeVar("T_contra", contravariant=True)


@dataclass(frozen=True)
class Record:
    """An envelope and where it was read from, so storage can point back at the log.

    `counted` is false for an event older than the late-event horizon: it is stored, not counted.
    """

    envelope: Envelope
    partition: int
    offset: int
    counted: bool = True


class Sink(Protocol, Generic[T_contra]):
    async def write(self, batch: T_contra) -> None: ...

    async def flush(self) -> None: ...
