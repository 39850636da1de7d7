"""The backfill of a new meter version (issue 21, ADR 0140, 0145): events produced and stored by a real processor
(deploy-time meters only), then versions of tenant A's meters with starts recorded by hand in the middle of each
partition; the backfill job counts exactly A's stored events below the starts, for COUNT, SUM, UNIQUE_COUNT and
WEIGHTED_SUM, across a kill -9 at a chunk boundary and in the middle of a chunk, publishes through the outbox to the
counter topic and Redis, and a version whose starts are not yet committed past waits and says why (a partition
without a start: tests/metering/test_meter_idle_partition.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import asyncpg
import redis

from tally.schemas.counters import CounterState
from tally.settings import Settings
from tally.sinks.redis_cache import cache_key
from tests.metering.helpers import run_tally
from tests.metering.meters_helpers import (DEFINITIONS, counters_of, events_for, expected_windows, new_version,
                                           record_starts)
from tests.processor.helpers import assert_topic_matches_postgres, drained, produce, wait_for
from tests.support import running


async def test_backfill_counts_exactly_the_stored_events_below_the_starts_across_kill_9(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings = isolated.model_copy(update={"batch_max_wait_ms": 50, "jobs_metrics_port": 0})
    a, b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    base = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    with running("processor", ["process"], settings):
        produce(settings, [e for pair in zip(events_for(a, base, now), events_for(b, base, now)) for e in pair])
        await wait_for(lambda: drained(settings, db), 90, "the processor")
    assert await db.fetchval("select count(*) from events where tenant = any($1::text[])", [a, b]) == 300

    # Starts in the middle of each partition (of the events of both tenants, interleaved).
    offsets = defaultdict(list)
    for r in await db.fetch("select kafka_partition, kafka_offset from events where tenant = any($1::text[])", [a, b]):
        offsets[r[0]].append(r[1])
    assert len(offsets) == settings.events_partitions
    starts = {p: sorted(o)[len(o) // 2] for p, o in offsets.items()}

    # Versions other tests of the session left to backfill go first (the job takes every tenant's, oldest first):
    # done now, the kills below land in this test's chunks.
    code, out = run_tally(["jobs", "run", "meters_backfill"], settings)
    assert code == 0, out

    ids = {}
    calls_v1 = await new_version(db, a, "calls", 1, {**DEFINITIONS["calls"], "windows": ["day"]})
    last = max(offsets)
    await record_starts(db, a, calls_v1, {**starts, last: max(offsets[last]) + 10})  # one the group has not reached
    ids["calls"] = await new_version(db, a, "calls", 2, DEFINITIONS["calls"])  # counters `calls@2`
    for slug in ("tokens", "users", "seats"):
        ids[slug] = await new_version(db, a, slug, 1, DEFINITIONS[slug])
    for vid in ids.values():
        await record_starts(db, a, vid, starts)
    ahead = await new_version(db, a, "ahead", 1, DEFINITIONS["calls"])
    await record_starts(db, a, ahead, {p: max(o) + 10 for p, o in offsets.items()})  # the group has not got there

    chunked = {"TALLY_METERS_BACKFILL_CHUNK": "7", "TALLY_METERS_BACKFILL_PAUSE_S": "0"}
    code, out = run_tally(["jobs", "run", "meters_backfill"], settings, TALLY_CRASH_AT="backfill_after_chunk",
                          **chunked)
    assert code == -9, out
    first = await db.fetchrow("select * from meter_backfills where tenant = $1 and version_id = $2", a, ids["calls"])
    assert (first["state"], first["counted"]) == ("running", 7) and first["total"] > 7
    code, out = run_tally(["jobs", "run", "meters_backfill"], settings, TALLY_CRASH_AT="backfill_mid_chunk", **chunked)
    assert code == -9, out
    again = await db.fetchrow("select * from meter_backfills where tenant = $1 and version_id = $2", a, ids["calls"])
    assert (again["counted"], again["cursor"]) == (7, first["cursor"])  # the killed chunk left nothing

    code, out = run_tally(["meters", "status", "--tenant", a], settings)
    assert code == 0 and f"calls v2: running 7/{first['total']} events" in out, out

    revision = await db.fetchval("select revision from meter_catalog")
    code, out = run_tally(["jobs", "run", "meters_backfill"], settings, **chunked)
    assert code == 0, out
    assert await db.fetchval("select revision from meter_catalog") == revision + len(ids)

    below = [r for r in await db.fetch(
        "select type, subject, time, data::text as data, kafka_partition, kafka_offset from events where tenant = $1",
        a) if r["kafka_offset"] < starts[r["kafka_partition"]]]
    for slug, vid in ids.items():
        counter = "calls@2" if slug == "calls" else slug
        expected = expected_windows(below, slug)
        assert expected and await counters_of(db, a, counter) == expected, slug
        row = await db.fetchrow("select * from meter_backfills where tenant = $1 and version_id = $2", a, vid)
        matching = [r for r in below if r["type"] == DEFINITIONS[slug]["event_type"]]
        assert (row["state"], row["counted"], row["total"]) == ("done", len(matching), len(matching)), slug
        assert row["backfilled_from"] == min(r["time"] for r in matching) and row["finished_at"] is not None
    assert await counters_of(db, a, "calls") == {}  # version 1 waits: nothing counted under its name
    counters = ["calls@2", "tokens", "users", "seats", "calls", "ahead"]
    assert await db.fetchval("select count(*) from counters where tenant = $1 and meter = any($2::text[])", b,
                             counters) == 0

    # The counter topic and Redis follow: nothing of A's left queued, every window published and cached as stored.
    assert await db.fetchval("select count(*) from counter_outbox o join counters c using (key) where c.tenant = $1",
                             a) == 0
    await assert_topic_matches_postgres(settings, db, a)
    cache = redis.Redis.from_url(settings.redis_url)
    try:
        for r in await db.fetch("select key, value, revision from counters where tenant = $1"
                                " and meter = any($2::text[])", a, counters):
            state = CounterState.from_bytes(await asyncio.to_thread(cache.hget, cache_key(settings.redis_prefix,
                                                                                          r["key"]), "state"))
            assert (Decimal(state.value), state.revision) == (r["value"], r["revision"])
    finally:
        cache.close()

    code, out = run_tally(["meters", "status", "--tenant", a], settings)
    assert code == 0, out
    lines = {line.split(":")[0]: line for line in out.splitlines() if line.startswith(a)}
    assert f"on partition {last}, below its start {max(offsets[last]) + 10}" in lines[f"{a} calls v1"], out
    assert "waits: the processors' group committed" in lines[f"{a} ahead v1"], out
    assert lines[f"{a} seats v1"].startswith(f"{a} seats v1: done "), out
