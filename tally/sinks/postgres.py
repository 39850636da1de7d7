"""PostgreSQL sink: dedup claims, new events, counter windows and the outbox in one transaction.

Each transaction commits whole (its keys claimed, its new events stored, their counter deltas
applied, the touched windows queued for publication) or not at all, so a re-delivered event is
always a duplicate and never counted twice. Keys and counters are touched in sorted order so
that concurrent consumers lock rows in the same order and do not deadlock.

A share that fails for a reason of its records (sinks.errors) is bisected: its halves are written in
transactions of their own until the records that can never be written are found alone; those are
returned as poison for the dead-letter topic and everything else is stored once (docs/adr/0015).

The first copy of a (tenant, source, id) to commit is kept. A later copy with the same content
digest is a duplicate; one with other content is a conflict, returned with where the kept copy
was read, for the processor to report (docs/adr/0014). Nothing is substituted silently.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg
import orjson

from tally.schemas.counters import CounterDelta
from tally.schemas.envelope import content_digest
from tally.sinks.base import Record
from tally.sinks.errors import is_poison

# The fence (docs/adr/0143): the catalog revision, share-locked, returned with every claimed key. A meter version
# cannot be created while a transaction that read the revision before it is open, so a transaction that counted
# under an older catalog has committed before the version exists, and one that commits after saw it.
_CLAIM = """
with fence as (select revision from meter_catalog for share)
insert into event_keys (tenant, source, id, digest, kafka_partition, kafka_offset)
select * from unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::int[], $6::bigint[])
         as k(tenant, source, id, digest, kafka_partition, kafka_offset)
order by tenant, source, id
on conflict do nothing
returning kafka_partition, kafka_offset, (select revision from fence)
"""

# The kept copies of keys this transaction did not claim. Under READ COMMITTED this statement sees a
# key another transaction committed while the claim waited for it.
_KEPT = """
select k.tenant, k.source, k.id, k.digest, k.kafka_partition, k.kafka_offset
from event_keys k join unnest($1::text[], $2::text[], $3::text[]) as u(tenant, source, id) using (tenant, source, id)
"""

_EVENT_COLUMNS = (
    "tenant", "source", "id", "type", "subject", "time", "received_at", "data",
    "kafka_partition", "kafka_offset", "counted",
)

# Counter windows upserted and queued for publication in one statement, both in key order (the lock order).
# The queue entry carries the revision committed here: the relay deletes an entry only up to the revision it
# published, so an update committed while a relay publishes an older state stays queued (sinks.outbox).
_UPSERT_AND_QUEUE = """
with upserted as (
    insert into counters as c (key, tenant, meter, aggregation, window_name, window_start, window_end,
                               subject, grp, value, count, latest_time, total, level, integrated_until, sample_level)
    select k, t, m, a, w, ws, we, s, g::jsonb, case when a = 'AVG' then tot / n else v end, n, lt, tot, lv, iu, sl
    from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[],
                $8::text[], $9::text[], $10::numeric[], $11::bigint[], $12::timestamptz[],
                $13::numeric[], $14::numeric[], $15::timestamptz[], $16::smallint[])
         as u(k, t, m, a, w, ws, we, s, g, v, n, lt, tot, lv, iu, sl)
    order by k
    on conflict (tenant, key) do update set
        value = case c.aggregation
            when 'COUNT' then c.value + excluded.value
            when 'SUM' then c.value + excluded.value
            when 'MAX' then greatest(c.value, excluded.value)
            when 'MIN' then least(c.value, excluded.value)
            when 'AVG' then (c.total + excluded.total) / (c.count + excluded.count)
            -- computed against the stored state under the window's lock (tally/meters/stateful.py)
            when 'UNIQUE_COUNT' then excluded.value
            when 'WEIGHTED_SUM' then excluded.value
            else case when excluded.latest_time >= c.latest_time then excluded.value else c.value end
        end,
        total = case c.aggregation when 'AVG' then c.total + excluded.total else excluded.total end,
        level = excluded.level,
        integrated_until = excluded.integrated_until,
        sample_level = excluded.sample_level,
        count = c.count + excluded.count,
        latest_time = greatest(c.latest_time, excluded.latest_time),
        revision = c.revision + 1,
        updated_at = now()
    returning tenant, key, revision
)
insert into counter_outbox (tenant, key, revision) select tenant, key, revision from upserted order by key
on conflict (tenant, key) do update set revision = greatest(counter_outbox.revision, excluded.revision), queued_at = now()
"""


@dataclass(frozen=True)
class Conflict:
    """A copy of an event whose id was already kept with other content, and where the kept copy was read."""

    record: Record
    kept_partition: int
    kept_offset: int


@dataclass(frozen=True)
class Poison:
    """A record that failed alone for a reason of its own: it can never be written."""

    record: Record
    error_class: str
    message: str


@dataclass
class StoreResult:
    new: list[Record] = field(default_factory=list)
    duplicates: int = 0
    counters: int = 0
    conflicts: list[Conflict] = field(default_factory=list)
    poison: list[Poison] = field(default_factory=list)

    def __add__(self, other: "StoreResult") -> "StoreResult":
        return StoreResult(self.new + other.new, self.duplicates + other.duplicates, self.counters + other.counters,
                           self.conflicts + other.conflicts, self.poison + other.poison)


class StaleCatalog(Exception):
    """The meter catalog moved since the counting meters were loaded: the transaction rolled back, and the batch is
    counted again once they are refreshed."""


class LiveCounting(Protocol):
    """What a write transaction asks of the live meters (tally.meters.live): the catalog revision they were
    loaded at, and the starts of the versions on the partitions it writes."""

    revision: int
    stale: bool

    async def record_starts(self, conn: asyncpg.Connection, new: Sequence[Record]) -> list[int]: ...

    def unrecord(self, partitions: list[int]) -> None: ...


Aggregate = Callable[[Sequence[Record]], list[tuple[str, CounterDelta]]]
# Deltas computed against stored state, inside the transaction (UNIQUE_COUNT, WEIGHTED_SUM).
StatefulAggregate = Callable[[asyncpg.Connection, Sequence[Record]], Awaitable[list[tuple[str, CounterDelta]]]]


class PostgresSink:
    """Persists each (tenant, source, id) once and applies the meters to it in the same transaction.

    `aggregate` turns the records found new into one delta per counter window, sorted by key text.
    A batch is written as `parallel` transactions on as many connections, one per share of its Kafka
    partitions: a subject's events and its counter windows stay in one partition, so the transactions
    rarely touch the same rows, PostgreSQL works on them side by side, and Python prepares one while
    PostgreSQL writes another. Each is complete on its own; the caller commits offsets after all.
    """

    def __init__(self, pool: asyncpg.Pool, aggregate: Aggregate, parallel: int = 1,
                 on_commit: Callable[[], None] | None = None, stateful: StatefulAggregate | None = None,
                 live: LiveCounting | None = None) -> None:
        self._pool = pool
        self._live = live
        self._aggregate = aggregate
        self._stateful = stateful
        self._parallel = max(1, parallel)
        self._on_commit = on_commit  # called after each transaction commits (the tests' crash hook)
        self._pending: list[Record] = []

    async def write(self, batch: Sequence[Record]) -> None:
        """Queue records; of several with one dedup key (tenant, source, id), the first to commit is kept."""
        self._pending.extend(batch)

    async def flush(self) -> StoreResult:
        """Write what was queued; what the store found (new, duplicates, conflicts, poison)."""
        records, self._pending = self._pending, []
        shares: list[list[Record]] = [[] for _ in range(self._parallel)]
        for r in records:
            shares[r.partition % self._parallel].append(r)
        results = await asyncio.gather(*(self._store(share) for share in shares if share), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        return sum(results, StoreResult())

    async def _store(self, share: list[Record]) -> StoreResult:
        """The share in one transaction; if its records make it fail, each half in its own, down to the
        single records that fail alone. Halves are written in order, so the first copy of a key still
        commits first."""
        try:
            return await self._transaction(share)
        except Exception as exc:  # anything that is not poison is raised again
            if not is_poison(exc):
                raise
            if len(share) == 1:
                return StoreResult(poison=[Poison(share[0], type(exc).__name__, _reason(exc))])
        half = len(share) // 2
        return await self._store(share[:half]) + await self._store(share[half:])

    async def _transaction(self, share: list[Record]) -> StoreResult:
        """One transaction: claim the keys, store the new events, apply and queue their counter windows,
        and tell the copies that repeat a kept event's id with other content from plain duplicates."""
        first: dict[tuple[str, str, str], tuple[Record, bytes]] = {}
        repeats: list[tuple[Record, bytes]] = []
        for r in share:
            e = r.envelope
            key = (e.tenant, e.source, e.id)
            if key in first:
                repeats.append((r, content_digest(e)))
            else:
                first[key] = (r, content_digest(e))
        staged: list[int] = []
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # The statement sorts the keys itself (the lock order); Python only maps them back.
                # A claimed key is named by where its first copy was read: two ints, no text to decode.
                rows = await conn.fetch(_CLAIM, *_claim_columns(first))
                claimed = {(row[0], row[1]) for row in rows}
                new = [r for r, _ in first.values() if (r.partition, r.offset) in claimed]
                if new and self._live is not None:
                    if rows[0][2] != self._live.revision:
                        self._live.stale = True
                        raise StaleCatalog(f"meter catalog at revision {rows[0][2]}, counted at {self._live.revision}")
                    staged = await self._live.record_starts(conn, new)
                if new:
                    await conn.copy_records_to_table("events", records=[_row(r) for r in new], columns=_EVENT_COLUMNS)
                deltas = self._aggregate(new)
                if self._stateful is not None and new:
                    found = await self._stateful(conn, new)
                    if found:
                        deltas = sorted(deltas + found, key=lambda item: item[0])
                await write_counters(conn, deltas)
                repeats += [(r, digest) for r, digest in first.values() if (r.partition, r.offset) not in claimed]
                conflicts = await _conflicts(conn, repeats) if repeats else []
        except BaseException:
            if staged and self._live is not None:
                self._live.unrecord(staged)
            raise
        if self._on_commit is not None:
            self._on_commit()
        return StoreResult(new=new, duplicates=len(share) - len(new) - len(conflicts), counters=len(deltas),
                           conflicts=conflicts)


async def write_counters(conn: asyncpg.Connection, deltas: list[tuple[str, CounterDelta]]) -> None:
    """Upsert counter deltas (sorted by key text, the lock order) and queue their windows in the outbox, inside the
    caller's transaction: the processor's and the meter backfill's one way to count (tally/meters/backfill.py)."""
    if deltas:
        await conn.execute(_UPSERT_AND_QUEUE, *_counter_columns(deltas))


def _reason(exc: BaseException) -> str:
    sqlstate = getattr(exc, "sqlstate", None)
    return f"PostgreSQL refused the event (SQLSTATE {sqlstate}): {exc}" if sqlstate else f"the event cannot be stored: {exc}"


async def _conflicts(conn: asyncpg.Connection, repeats: list[tuple[Record, bytes]]) -> list[Conflict]:
    """The repeats whose content differs from the kept copy's (a key kept before digests were stored has
    none, and its repeats count as duplicates)."""
    keys = {(r.envelope.tenant, r.envelope.source, r.envelope.id) for r, _ in repeats}
    kept = {(row[0], row[1], row[2]): row for row in await conn.fetch(_KEPT, *map(list, zip(*keys)))}
    conflicts = []
    for record, digest in repeats:
        e = record.envelope
        row = kept[(e.tenant, e.source, e.id)]
        if row["digest"] is not None and row["digest"] != digest:
            conflicts.append(Conflict(record, row["kafka_partition"], row["kafka_offset"]))
    return conflicts


def _claim_columns(first: dict[tuple[str, str, str], tuple[Record, bytes]]) -> list[list]:
    kept = first.values()
    return [[k[0] for k in first], [k[1] for k in first], [k[2] for k in first], [d for _, d in kept],
            [r.partition for r, _ in kept], [r.offset for r, _ in kept]]


def _counter_columns(deltas: list[tuple[str, CounterDelta]]) -> list[list]:
    columns: list[list] = [[] for _ in range(16)]
    for text, d in deltas:
        k = d.key
        for column, value in zip(columns, (
            text, k.tenant, k.meter, d.aggregation.value, k.window, k.window_start, d.window_end,
            k.subject, orjson.dumps(dict(k.group)).decode(), d.value, d.count, d.latest_time,
            d.total, d.level, d.integrated_until, d.sample_level,
        )):
            column.append(value)
    return columns


def _row(record: Record) -> tuple:
    e = record.envelope
    data = None if e.data is None else orjson.dumps(e.data).decode()
    return (e.tenant, e.source, e.id, e.type, e.subject, e.time, e.received_at, data,
            record.partition, record.offset, record.counted)
