"""PostgreSQL stopped while the processor's maintenance prunes distinct values (ADR 0160): the processor retries
its maintenance step, stays alive, prunes the rest once the database returns, keeps what is within retention, and
counts every event once.

A row lock on some distinct values of an expired window, taken before the processor starts, holds a pruning
statement of its first maintenance until the database is stopped, so the outage always meets pruning under way
rather than falling between maintenance runs by chance (or a run pruning everything while the test seeds). Level
changes are pruned after the windows, so they are all still to be pruned when the outage comes.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg

from tally.meters.unique import window_id
from tally.meters.weighted import series_text
from tally.settings import Settings
from tests.processor.helpers import (
    counter_counts, drained, envelope, event_count, expected_counts, produce, wait_for,
)
from tests.processor.scratch_pg import ScratchPostgres
from tests.support import TallyProcess, read_topic, running, wait_until

# Distinct values per UNIQUE_COUNT window (name: window size, days since its end, values): the expired ones hold
# more values than a pruning batch (5,000) between them; the last expired one is the one locked.
WINDOWS = {"old-a": ("minute", 40, 7000), "old-b": ("minute", 39, 4000), "old-hour": ("hour", 500, 300),
           "old-day": ("day", 900, 200), "old-locked": ("minute", 35, 1500),
           "kept-minute": ("minute", 2, 2500), "kept-hour": ("hour", 40, 600), "kept-day": ("day", 300, 100)}
SERIES, OLD_POINTS = 60, 100  # 60 series of 99 level changes each to prune (two batches), three kept each


async def test_postgres_outage_mid_pruning_is_retried_and_prunes_exactly_what_retention_says(
    isolated: Settings, scratch_pg: ScratchPostgres
) -> None:
    live, stored = (f"prune-{uuid.uuid4().hex[:8]}" for _ in range(2))
    settings = isolated.model_copy(update={
        "database_url": scratch_pg.url, "batch_max_messages": 200, "retry_max_ms": 1000, "processor_metrics_port": 0,
        "maintenance_every_s": 1, "counter_retention_day_days": 800, "counter_retention_month_days": 800,
    })
    events = [envelope(live, n) for n in range(900)]
    now = datetime.now(timezone.utc)
    produce(settings, events[:300])
    db = await asyncpg.connect(scratch_pg.url)
    kept_points = await _seed(db, stored, now)
    lock = await asyncpg.connect(scratch_pg.url)
    await lock.execute("begin")
    await lock.execute("select 1 from counter_distinct where tenant = $1 and window_id = $2 and hash < 50 for update",
                       stored, window_id(f"{stored}/old-locked"))

    with running("processor", ["process"], settings) as processor:
        try:  # the maintenance at start prunes up to the locked values
            await wait_for(lambda: _pruning_blocked(db, processor), 60, "maintenance to prune up to the locked values")
            assert processor.alive(), processor.output()[-3000:]
            # Under way: a batch of values or more gone, the locked window's batch not committed, no level change gone.
            assert await _distinct_left(db, stored, "old-a") + await _distinct_left(db, stored, "old-b") <= 6000
            assert await _distinct_left(db, stored, "old-locked") == 1500
            assert len(await _points(db, stored)) == SERIES * (OLD_POINTS + 2)
        finally:
            await db.close()
        await asyncio.to_thread(scratch_pg.stop)  # ends the lock's session too
        lock.terminate()
        produce(settings, events[300:] + events[:100])
        await asyncio.to_thread(wait_until, lambda: "maintenance failed (attempt 3)" in processor.output()
                                or not processor.alive(), 60, 0.2, "the processor to retry its maintenance")
        assert processor.alive(), processor.output()[-3000:]
        await asyncio.to_thread(scratch_pg.start)

        db = await asyncpg.connect(scratch_pg.url)
        try:
            await wait_for(lambda: _pruned(db, stored), 90, "maintenance to prune the rest")
            await wait_for(lambda: drained(settings, db), 90, "the events produced during the outage")
            assert await event_count(db, live) == 900
            assert await counter_counts(db, live) == expected_counts(events)

            windows = {r["key"].split("/", 1)[1]: (r["value"], r["count"])
                       for r in await db.fetch("select key, value, count from counters where tenant = $1", stored)}
            assert windows == {name: (n, n) for name, (_, _, n) in WINDOWS.items() if name.startswith("kept")}
            for name, (_, _, n) in WINDOWS.items():
                assert await _distinct_left(db, stored, name) == (n if name.startswith("kept") else 0), name
            assert await _points(db, stored) == kept_points
            assert processor.alive(), processor.output()[-3000:]
        finally:
            await db.close()
    assert "maintenance: " in processor.output()
    assert read_topic(settings.kafka_bootstrap, settings.topics.dlq) == []


async def _seed(db: asyncpg.Connection, tenant: str, now: datetime) -> set[tuple[str, datetime]]:
    """The UNIQUE_COUNT windows of WINDOWS with their values, and SERIES level-change series: per series OLD_POINTS
    changes a day apart before the month M holding the latest change before the cutoff (now - 800 days), that
    change and one yesterday. All before M go but the latest of them; the kept changes are answered."""
    for name, (size, days, n) in WINDOWS.items():
        end, key = now - timedelta(days=days), f"{tenant}/{name}"
        await db.execute("insert into counters (key, tenant, meter, aggregation, window_name, window_start, window_end,"
                         " value, count, latest_time) values ($1, $2, 'users', 'UNIQUE_COUNT', $3, $4, $5, $6::int,"
                         " $6::int, $4)", key, tenant, size, end - timedelta(minutes=1), end, n)
        await db.execute("insert into counter_distinct (tenant, window_id, hash) select $1, $2, h"
                         " from generate_series(1, $3::int) h", tenant, window_id(key), n)
    month = (now - timedelta(days=840)).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    rows, kept = [], set()
    for s in range(SERIES):
        series = series_text(tenant, "storage", f"s{s}", {})
        times = [month - timedelta(days=k) for k in range(1, OLD_POINTS + 1)]
        times += [month + timedelta(days=1), now - timedelta(days=1)]
        rows += [(tenant, series, at, f"c{i}", i) for i, at in enumerate(times)]
        kept |= {(series, at) for at in times[:1] + times[-2:]}
    await db.executemany("insert into weighted_points (tenant, series, at, source, id, level)"
                         " values ($1, $2, $3, 's', $4, $5)", rows)
    return kept


async def _pruning_blocked(db: asyncpg.Connection, processor: TallyProcess) -> bool:
    """A pruning statement waits for the locked values (or the processor died, which the caller reports)."""
    waiting = await db.fetchval("select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
                                " and query like '%delete from counter_distinct%'")
    return bool(waiting) or not processor.alive()


async def _distinct_left(db: asyncpg.Connection, tenant: str, name: str) -> int:
    return await db.fetchval("select count(*) from counter_distinct where tenant = $1 and window_id = $2",
                             tenant, window_id(f"{tenant}/{name}"))


async def _points(db: asyncpg.Connection, tenant: str) -> set[tuple[str, datetime]]:
    return {(r[0], r[1]) for r in await db.fetch("select series, at from weighted_points where tenant = $1", tenant)}


async def _pruned(db: asyncpg.Connection, tenant: str) -> bool:
    expired = await db.fetchval("select count(*) from counters where tenant = $1 and key not like '%/kept-%'", tenant)
    return expired == 0 and len(await _points(db, tenant)) == 3 * SERIES
