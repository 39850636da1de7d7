"""PostgreSQL sink: dedup claims and events written in one transaction."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import orjson

from sinks.base import Record

_CLAIM = """
insert into event_keys (tenant, source, id)
select * from unnest($1::text[], $2::text[], $3::text[])
on conflict do nothing
returning tenant, source, id
"""

_EVENT_COLUMNS = (
    "tenant", "source", "id", "type", "subject", "time", "received_at", "data", "kafka_partition", "kafka_offset",
)


class PostgresSink:
    """Persists each (tenant, source, id) once: the claim and the insert commit together or not at all."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._pending: list[Record] = []
        self.last_new = 0

    async def write(self, batch: Sequence[Record]) -> None:
        self._pending.extend(batch)

    async def flush(self) -> None:
        if not self._pending:
            self.last_new = 0
            return
        unique: dict[tuple[str, str, str], Record] = {}
        for record in self._pending:
            e = record.envelope
            unique.setdefault((e.tenant, e.source, e.id), record)
        async with self._pool.acquire() as conn, conn.transaction():
            keys = list(unique)
            claimed = await conn.fetch(_CLAIM, *(list(col) for col in zip(*keys)))
            new = [unique[(r["tenant"], r["source"], r["id"])] for r in claimed]
            if new:
                await conn.copy_records_to_table("events", records=[_row(r) for r in new], columns=_EVENT_COLUMNS)
        self.last_new = len(new)
        self._pending.clear()


def _row(record: Record) -> tuple:
    e = record.envelope
    data = None if e.data is None else orjson.dumps(e.data).decode()
    return (e.tenant, e.source, e.id, e.type, e.subject, e.time, e.received_at, data, record.partition, record.offset)
