"""PostgreSQL sink: dedup claims, new events, counter windows and the outbox in one transaction.

Each transaction commits whole (its keys claimed, its new events stored, their counter deltas
applied, the touched windows queued for publication) or not at all, so a re-delivered event is
always a duplicate and never counted twice. Keys and counters are touched in sorted order so
that concurrent consumers lock rows in the same order and do not deadlock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
import orjson

from schemas.counters import CounterDelta
from sinks.base import Record

_CLAIM = """
insert into event_keys (tenant, source, id)
select * from unnest($1::text[], $2::text[], $3::text[]) as k(tenant, source, id)
order by tenant, source, id
on conflict do nothing
returning tenant, source, id
"""

_EVENT_COLUMNS = (
    "tenant", "source", "id", "type", "subject", "time", "received_at", "data",
    "kafka_partition", "kafka_offset", "counted",
)

# Counter windows upserted and queued for publication in one statement, both in key order (the lock order).
# The queue uses DO UPDATE rather than DO NOTHING: it waits for a publisher holding the row, so a publisher
# can never delete a queued key after reading an older counter state than the one this transaction commits.
_UPSERT_AND_QUEUE = """
with upserted as (
    insert into counters as c (key, tenant, meter, aggregation, window_name, window_start, window_end,
                               subject, grp, value, count, latest_time)
    select k, t, m, a, w, ws, we, s, g::jsonb, v, n, lt
    from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[],
                $8::text[], $9::text[], $10::numeric[], $11::bigint[], $12::timestamptz[])
         as u(k, t, m, a, w, ws, we, s, g, v, n, lt)
    order by k
    on conflict (key) do update set
        value = case c.aggregation
            when 'COUNT' then c.value + excluded.value
            when 'SUM' then c.value + excluded.value
            when 'MAX' then greatest(c.value, excluded.value)
            when 'MIN' then least(c.value, excluded.value)
            else case when excluded.latest_time >= c.latest_time then excluded.value else c.value end
        end,
        count = c.count + excluded.count,
        latest_time = greatest(c.latest_time, excluded.latest_time),
        revision = c.revision + 1,
        updated_at = now()
    returning key
)
insert into counter_outbox (key) select key from upserted order by key
on conflict (key) do update set queued_at = now()
"""


@dataclass
class StoreResult:
    new: list[Record] = field(default_factory=list)
    duplicates: int = 0
    counters: int = 0


Aggregate = Callable[[Sequence[Record]], list[tuple[str, CounterDelta]]]


class PostgresSink:
    """Persists each (tenant, source, id) once and applies the meters to it in the same transaction.

    `aggregate` turns the records found new into one delta per counter window, sorted by key text.
    A batch is written as `parallel` transactions on as many connections, one per share of its Kafka
    partitions: a subject's events and its counter windows stay in one partition, so the transactions
    rarely touch the same rows, PostgreSQL works on them side by side, and Python prepares one while
    PostgreSQL writes another. Each is complete on its own; the caller commits offsets after all.
    """

    def __init__(self, pool: asyncpg.Pool, aggregate: Aggregate, parallel: int = 1,
                 on_commit: Callable[[], None] | None = None) -> None:
        self._pool = pool
        self._aggregate = aggregate
        self._parallel = max(1, parallel)
        self._on_commit = on_commit  # called after each transaction commits (the tests' crash hook)
        self._pending: list[Record] = []
        self.last = StoreResult()

    async def write(self, batch: Sequence[Record]) -> None:
        """Queue records; of several with one dedup key (tenant, source, id), the first one is kept."""
        self._pending.extend(batch)

    async def flush(self) -> None:
        records, self._pending = self._pending, []
        shares: list[dict[tuple[str, str, str], Record]] = [{} for _ in range(self._parallel)]
        seen: set[tuple[str, str, str]] = set()
        for r in records:
            e = r.envelope
            key = (e.tenant, e.source, e.id)
            if key not in seen:
                seen.add(key)
                shares[r.partition % self._parallel][key] = r
        results = await asyncio.gather(*(self._store(share) for share in shares if share), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        new = [record for result in results for record in result[0]]
        self.last = StoreResult(new=new, duplicates=len(records) - len(new), counters=sum(r[1] for r in results))

    async def _store(self, by_key: dict[tuple[str, str, str], Record]) -> tuple[list[Record], int]:
        """One transaction: claim the keys, store the new events, apply and queue their counter windows."""
        async with self._pool.acquire() as conn, conn.transaction():
            # The statement sorts the keys itself (the lock order); Python only maps them back.
            claimed = await conn.fetch(_CLAIM, *map(list, zip(*by_key)))
            new = [by_key[(tenant, source, id_)] for tenant, source, id_ in claimed]
            if new:
                await conn.copy_records_to_table("events", records=[_row(r) for r in new], columns=_EVENT_COLUMNS)
            deltas = self._aggregate(new)
            if deltas:
                await conn.execute(_UPSERT_AND_QUEUE, *_counter_columns(deltas))
        if self._on_commit is not None:
            self._on_commit()
        return new, len(deltas)

    async def ensure_partitions(self, months_back: int, months_ahead: int) -> int:
        """Create the monthly events partitions around now; returns how many were created."""
        async with self._pool.acquire() as conn:
            return await conn.fetchval("select tally_ensure_event_partitions($1, $2)", months_back, months_ahead)


def _counter_columns(deltas: list[tuple[str, CounterDelta]]) -> list[list]:
    columns: list[list] = [[] for _ in range(12)]
    for text, d in deltas:
        k = d.key
        for column, value in zip(columns, (
            text, k.tenant, k.meter, d.aggregation.value, k.window, k.window_start, d.window_end,
            k.subject, orjson.dumps(dict(k.group)).decode(), d.value, d.count, d.latest_time,
        )):
            column.append(value)
    return columns


def _row(record: Record) -> tuple:
    e = record.envelope
    data = None if e.data is None else orjson.dumps(e.data).decode()
    return (e.tenant, e.source, e.id, e.type, e.subject, e.time, e.received_at, data,
            record.partition, record.offset, record.counted)
