"""The exact backfill of a new meter version (ADR 0140, 0145): every stored event of its tenant below the version's
starts, counted with the processor's own code and storage, in bounded chunks.

A version is ready when every partition of the events topic has a start for it (`meter_starts`) and the processors'
group committed at or past each (a partition no new event reached since the version was made gets its start from
the backfill, at its end offset: docs/adr/0151): every event below a start is then stored (or a duplicate, or a
dead letter), and none of them was counted live for the version. Each chunk is one transaction: it reads the next events in keyset
order (time, partition, offset) through the (tenant, time) or (tenant, type, time) index, folds them with the
version's Meter (MeterSet, the stateful UNIQUE_COUNT and WEIGHTED_SUM modules), upserts the windows and queues them
in the outbox (sinks.postgres.write_counters), and advances the cursor and `counted`, so a kill -9 anywhere repeats
nothing. Events stored as late (`events.counted` false: older than the late horizon at receipt) are not counted,
as live. The chunk that finds the end marks the backfill done and moves `meter_catalog.revision` in its transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import asyncpg
import orjson

from tally.meters import stateful
from tally.meters.catalog import Catalog, MeterVersion
from tally.meters.definitions import Meter, MetersConfig
from tally.meters.meterset import MeterSet
from tally.sinks.base import EVENT_COLUMNS, Record, stored_event
from tally.sinks.postgres import write_counters

log = logging.getLogger("tally.meters")

# Where a backfill begins: before every storable event time (processors.storable.EARLIEST_TIME), partition and offset.
_ORIGIN = (datetime(1, 1, 1, tzinfo=timezone.utc), -1, -1)

# The tenant's counted events below the version's starts ($2: start offset per partition, indexed from 1).
_BELOW = "tenant = $1 and counted and kafka_offset < ($2::bigint[])[kafka_partition + 1]"
_TYPED = " and type = $3"  # an exact event type: the (tenant, type, time) index


@dataclass(frozen=True)
class BackfillConfig:
    kafka_bootstrap: str = "127.0.0.1:9092"
    events_topic: str = "tally.events.v1"
    consumer_group: str = "tally-processor"  # the processors' group, whose committed offsets say what is stored
    chunk: int = 5000  # events per transaction
    pause_s: float = 0.05  # between chunks: PostgreSQL serves the intake meanwhile
    statement_timeout_ms: int = 30000  # a chunk's statements
    budget_s: float = 60.0  # one run; the worker's other jobs take their turn, the next run resumes


# The group's committed offset per partition of the events topic (None: nothing committed), read from Kafka.
Committed = Callable[[], dict[int, int | None]]
# The end offset (high watermark) of every partition of the events topic, read from Kafka.
Ends = Callable[[], dict[int, int]]

# First writer wins, as the processor's own records (tally/meters/live.py): a start, once recorded, never changes.
_RECORD = """
insert into meter_starts (tenant, version_id, kafka_partition, start_offset)
select $1, $2, p, o from unnest($3::int[], $4::bigint[]) as u(p, o) order by p
on conflict do nothing
"""
_STARTS = "select kafka_partition, start_offset from meter_starts where tenant = $1 and version_id = $2"


def unready(starts: dict[int, int], committed: dict[int, int | None]) -> str | None:
    """Why the events below these starts are not all stored yet; None when they are."""
    missing = sorted(set(committed) - set(starts))
    if missing:
        return f"no start recorded on partition(s) {', '.join(map(str, missing))}: no processor took the version up there"
    behind = [p for p in sorted(starts) if (committed.get(p) or 0) < starts[p]]
    if behind:
        p = behind[0]
        more = f" (and {len(behind) - 1} more partition(s))" if len(behind) > 1 else ""
        at = committed.get(p)
        return (f"the processors' group committed {'nothing' if at is None else at} on partition {p}, below its start"
                f" {starts[p]}{more}")
    return None


def _exact_type(meter: Meter) -> str | None:
    """The meter's event type when it is not a glob: the chunks then read through the (tenant, type, time) index."""
    return None if any(c in meter.event_type for c in "*?[") else meter.event_type


class _Version:
    """One version's backfill: its meter compiled and its statements."""

    def __init__(self, version: MeterVersion, starts: dict[int, int]) -> None:
        self.tenant, self.id = version.tenant, version.id
        self.meter = version.meter
        self.starts = [starts.get(p, 0) for p in range(max(starts, default=-1) + 1)]
        self.meters = MeterSet(MetersConfig(meters=[self.meter])) if self.meter is not None else None
        typed = self.meter is not None and _exact_type(self.meter) is not None
        self.args: list[Any] = [self.tenant, self.starts] + ([_exact_type(self.meter)] if typed else [])
        where = _BELOW + (_TYPED if typed else "")
        n = len(self.args)
        self.total_sql = f"select count(*), min(time) from events where {where}"
        self.chunk_sql = (f"select {EVENT_COLUMNS}, kafka_partition, kafka_offset from events where {where}"
                          f" and time >= ${n + 1} and (time, kafka_partition, kafka_offset) > (${n + 1}, ${n + 2}, ${n + 3})"
                          f" order by time, kafka_partition, kafka_offset limit ${n + 4}")


async def run(pool: asyncpg.Pool, catalog: Catalog, config: BackfillConfig, committed: Committed, ends: Ends,
              hook: Callable[[str], None] = lambda _point: None) -> dict[str, Any]:
    """Backfill every version waiting or running that is ready, within the run's budget; say why the others wait.
    A waiting version's partitions without a start get one at their end offset (`_start_idle`).
    `hook` is the tests' crash hook: backfill_mid_chunk (a chunk's counters written, not committed) and
    backfill_after_chunk (a chunk committed)."""
    rows = await pool.fetch("select tenant, version_id, state from meter_backfills where state in ('waiting', 'running')"
                            " order by version_id")
    figures: dict[str, Any] = {"done": 0, "waiting": 0, "counted": 0}
    if not rows:
        return figures
    await catalog.refresh(pool)
    offsets = await asyncio.to_thread(committed)
    high: dict[int, int] | None = None  # read once a run, when some waiting version lacks a start
    deadline = time.monotonic() + config.budget_s
    for row in rows:
        tenant, version_id = row["tenant"], row["version_id"]
        version = catalog.version(tenant, version_id)
        if version is None:
            raise LookupError(f"meter_backfills names version {version_id} of {tenant}, which meter_versions lacks")
        starts = {r[0]: r[1] for r in await pool.fetch(_STARTS, tenant, version_id)}
        if row["state"] == "waiting" and set(offsets) - set(starts):
            high = high if high is not None else await asyncio.to_thread(ends)
            starts = await _start_idle(pool, tenant, version_id, starts, high)
        job = _Version(version, starts)
        if row["state"] == "waiting":
            reason = unready(starts, offsets)
            if reason is not None:
                await pool.execute("update meter_backfills set waiting_for = $3, updated_at = now()"
                                   " where tenant = $1 and version_id = $2", tenant, version_id, reason)
                figures["waiting"] += 1
                continue
            await _begin(pool, job)
        while time.monotonic() < deadline:
            counted, done = await _chunk(pool, job, config, hook)
            figures["counted"] += counted
            if done:
                figures["done"] += 1
                break
            await asyncio.sleep(config.pause_s)
        else:
            break  # over the budget: the next run resumes from the cursor
    return figures


async def _start_idle(pool: asyncpg.Pool, tenant: str, version_id: int, starts: dict[int, int],
                      high: dict[int, int]) -> dict[int, int]:
    """Record the version's start on each partition that has none at the partition's end offset, read after the
    version was made (docs/adr/0151): every message below it was produced before; a member writes those it has
    not written yet knowing the version (the catalog fence) and, being below the start, does not count them live:
    they are ours once the group committed past it. Every message at or above it is counted live. A member's own
    start recorded meanwhile wins or loses on the primary key; the starts are read back either way."""
    idle = sorted(set(high) - set(starts))
    if idle:
        await pool.execute(_RECORD, tenant, version_id, idle, [high[p] for p in idle])
        starts = {r[0]: r[1] for r in await pool.fetch(_STARTS, tenant, version_id)}
    return starts


async def _begin(pool: asyncpg.Pool, job: _Version) -> None:
    """waiting -> running, with the number of events to count and the oldest of them (`backfilled_from`: older
    ones are past the retention of `events`, gone)."""
    total, oldest = (0, None) if job.meter is None else await pool.fetchrow(job.total_sql, *job.args)
    await pool.execute("update meter_backfills set state = 'running', total = $3, backfilled_from = $4,"
                       " started_at = now(), waiting_for = null, updated_at = now()"
                       " where tenant = $1 and version_id = $2 and state = 'waiting'", job.tenant, job.id, total, oldest)


async def _chunk(pool: asyncpg.Pool, job: _Version, config: BackfillConfig,
                 hook: Callable[[str], None]) -> tuple[int, bool]:
    """One chunk in one transaction: its counters, the cursor and `counted`; at the end, done. (counted, done)"""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"set local statement_timeout = {int(config.statement_timeout_ms)}")
        state = await conn.fetchrow("select state, cursor from meter_backfills where tenant = $1 and version_id = $2"
                                    " for update", job.tenant, job.id)
        if state["state"] == "done":  # another run finished it meanwhile
            return 0, True
        rows = []
        if job.meters is not None:
            at, partition, offset = _ORIGIN if state["cursor"] is None else _cursor(orjson.loads(state["cursor"]))
            rows = await conn.fetch(job.chunk_sql, *job.args, at, partition, offset, config.chunk)
        if rows:
            records = _readable(job, [Record(stored_event(r), r["kafka_partition"], r["kafka_offset"]) for r in rows])
            deltas = job.meters.aggregate(records)
            if job.meters.has_stateful:
                deltas = sorted(deltas + await stateful.apply(job.meters, conn, records), key=lambda item: item[0])
            await write_counters(conn, deltas)
            last = rows[-1]
            cursor = orjson.dumps({"time": last["time"].isoformat(), "partition": last["kafka_partition"],
                                   "offset": last["kafka_offset"]}).decode()
            await conn.execute("update meter_backfills set cursor = $3::jsonb, counted = counted + $4, updated_at = now()"
                               " where tenant = $1 and version_id = $2", job.tenant, job.id, cursor, len(rows))
            hook("backfill_mid_chunk")
        done = len(rows) < config.chunk
        if done:
            await conn.execute("update meter_backfills set state = 'done', finished_at = now(), updated_at = now()"
                               " where tenant = $1 and version_id = $2", job.tenant, job.id)
            # Processes learn that the version is readable (reads use the newest version whose backfill is done).
            await conn.execute("update meter_catalog set revision = revision + 1")
    hook("backfill_after_chunk")
    return len(rows), done


def _readable(job: _Version, records: list[Record]) -> list[Record]:
    readable, refused = job.meters.readable(records)
    for r, exc in refused:
        log.warning("backfill of %s version %d leaves out %s/%s: %s", job.tenant, job.id,
                    r.envelope.source, r.envelope.id, exc)
    return readable


def _cursor(saved: dict[str, Any]) -> tuple[datetime, int, int]:
    return datetime.fromisoformat(saved["time"]), saved["partition"], saved["offset"]


_STATUS = """
select b.tenant, v.slug, v.version, b.state, b.counted, b.total, b.backfilled_from, b.started_at, b.finished_at,
       b.waiting_for, b.updated_at
from meter_backfills b join meter_versions v on v.tenant = b.tenant and v.id = b.version_id
where $1::text is null or b.tenant = $1
order by b.tenant, v.slug, v.version
"""


async def status(conn: asyncpg.Connection | asyncpg.Pool, tenant: str | None = None) -> list[asyncpg.Record]:
    """Every version's backfill (of one tenant): state, counted of total, from when, started, finished, why it waits."""
    return await conn.fetch(_STATUS, tenant)
