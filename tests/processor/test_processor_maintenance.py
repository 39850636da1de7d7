"""`tally maintenance`: a partition for every month that holds events (nothing left in the default
partition), event keys pruned by age, counter windows pruned by window size, their queue entries too."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg

from tally.settings import ROOT, Settings
from tests.processor.helpers import wait_for
from tests.support import env_for, running


async def test_maintenance_partitions_every_month_with_events_and_prunes_by_age(
    settings: Settings, db: asyncpg.Connection
) -> None:
    tenant = f"upkeep-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    backfill = datetime(2001, 3, 15, 12, tzinfo=timezone.utc)
    await db.execute("insert into events (tenant, source, id, type, time, received_at, kafka_partition, kafka_offset)"
                     " values ($1, 's', 'old', 't', $2, $3, 0, 0)", tenant, backfill, now)
    assert await db.fetchval("select count(*) from events_default where tenant = $1", tenant) == 1
    await db.executemany("insert into event_keys (tenant, source, id, first_seen) values ($1, 's', $2, $3)",
                         [(tenant, "stale", now - timedelta(days=40)), (tenant, "fresh", now - timedelta(days=2))])
    windows = {"minute": now - timedelta(days=40), "hour": now - timedelta(days=40), "day": now - timedelta(days=4000)}
    for window, end in windows.items():
        await db.execute("insert into counters (key, tenant, meter, aggregation, window_name, window_start, window_end,"
                         " value, count, latest_time) values ($1, $2, 'm', 'COUNT', $3, $4, $4, 1, 1, $4)",
                         f"{tenant}/{window}", tenant, window, end)
    await db.execute("insert into counter_outbox (tenant, key) values ($1, $2)", tenant, f"{tenant}/minute")

    env = env_for(settings, TALLY_EVENT_KEYS_RETENTION_DAYS="30")
    done = subprocess.run([sys.executable, "-m", "tally.cli", "maintenance"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "event keys pruned: 1" in done.stdout and "1 minute" in done.stdout, done.stdout

    assert await db.fetchval("select to_regclass('events_y2001m03') is not null")
    assert await db.fetchval("select count(*) from events_default") == 0
    assert await db.fetchval("select count(*) from events_y2001m03 where tenant = $1", tenant) == 1
    assert [r[0] for r in await db.fetch("select id from event_keys where tenant = $1", tenant)] == ["fresh"]
    kept = {r[0] for r in await db.fetch("select window_name from counters where tenant = $1", tenant)}
    assert kept == {"hour", "day"}  # hours are kept 400 days, days for ever
    assert await db.fetchval("select count(*) from counter_outbox where key = $1", f"{tenant}/minute") == 0


async def test_a_processor_looks_after_storage_as_it_starts(isolated: Settings, db: asyncpg.Connection) -> None:
    """At start, whatever the host's uptime (it used to wait six hours from boot)."""
    tenant = f"upkeep-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    await db.execute("insert into events (tenant, source, id, type, time, received_at, kafka_partition, kafka_offset)"
                     " values ($1, 's', 'old', 't', $2, $3, 0, 0)", tenant, datetime(2002, 7, 1, tzinfo=timezone.utc), now)
    with running("processor", ["process"], isolated):
        await wait_for(lambda: db.fetchval("select to_regclass('events_y2002m07') is not null"), 30,
                       "the processor to partition the backfilled month")
