"""Issue 21's proof, end to end on real Kafka, PostgreSQL and Redis: a tenant's meters created while events flow
through two processor members count every stored event of the tenant exactly once, the ones the members had
passed by the backfill and the rest live, for COUNT, SUM, UNIQUE_COUNT and WEIGHTED_SUM; across a kill -9 of a
member and of the backfill and a rebalance during the backfill; and a new version of a meter fills exactly while
the old version's counters stop where it took over."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import asyncpg

from tally.settings import Settings
from tests.metering.helpers import run_tally
from tests.metering.meters_helpers import (DEFINITIONS, backfilled, counters_of, events_for, expected_windows,
                                           meter_test, new_version)
from tests.processor.helpers import drained, produce, wait_for
from tests.support import TallyProcess, running


def _setting_out(isolated: Settings) -> tuple[Settings, str, str, datetime, datetime]:
    """The test's settings, two tenants (A defines meters, B never sees them), and the hour events start from."""
    settings, a, base, now = meter_test(isolated, batch_max_messages=100, processor_metrics_port=0)
    return settings, a, f"b-{uuid.uuid4().hex[:8]}", base, now


async def _flow(settings: Settings, tenants: list[str], rounds: range, base: datetime, now: datetime) -> None:
    """Events of every tenant, a round of 30 each every 0.2 s: a steady stream while the test acts."""
    for r in rounds:
        produce(settings, [e for t in tenants for e in events_for(t, base + timedelta(seconds=5 * r), now, 30, 30 * r)])
        await asyncio.sleep(0.2)


async def _stored(db: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    return await db.fetch("select type, subject, time, data::text as data, kafka_partition, kafka_offset from events"
                          " where tenant = $1", tenant)


async def _assert_exact(db: asyncpg.Connection, tenant: str, other: str, counters: dict[str, str]) -> None:
    """Each meter's counters equal its windows computed by hand from every stored event of the tenant."""
    rows = await _stored(db, tenant)
    for slug, counter in counters.items():
        assert await counters_of(db, tenant, counter) == expected_windows(rows, slug), slug
    assert await db.fetchval("select count(*) from counters where tenant = $1 and meter = any($2::text[])", other,
                             list(counters.values())) == 0


async def test_meters_created_while_events_flow_through_two_members_count_every_stored_event_once(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings, a, b, base, now = _setting_out(isolated)
    with running("processor-a", ["process"], settings), running("processor-b", ["process"], settings):
        await _flow(settings, [a, b], range(0, 10), base, now)
        ids = [await new_version(db, a, slug, 1, DEFINITIONS[slug]) for slug in DEFINITIONS]
        await _flow(settings, [a, b], range(10, 20), base, now)
        await wait_for(lambda: drained(settings, db), 90, "the processors")
        starts = await db.fetch("select version_id, count(*) as n from meter_starts where tenant = $1"
                                " group by version_id", a)
        assert {r["version_id"]: r["n"] for r in starts} == {i: settings.events_partitions for i in ids}
        await backfilled(settings, db, a, ids)
    await _assert_exact(db, a, b, {slug: slug for slug in DEFINITIONS})


async def test_kill_9_of_a_member_and_of_the_backfill_and_a_rebalance_during_it_keep_the_counts_exact(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings, a, b, base, now = _setting_out(isolated)
    with running("processor-a", ["process"], settings):
        victim = TallyProcess("processor-b", ["process"], settings)
        try:
            await _flow(settings, [a, b], range(0, 8), base, now)
            ids = [await new_version(db, a, slug, 1, DEFINITIONS[slug]) for slug in DEFINITIONS]
            await _flow(settings, [a, b], range(8, 12), base, now)
            victim.kill9()  # kill -9 while the stream goes on
            await _flow(settings, [a, b], range(12, 16), base, now)
        finally:
            victim.stop()
        await wait_for(lambda: drained(settings, db), 90, "the surviving processor")
        code, out = await asyncio.to_thread(run_tally, ["jobs", "run", "meters_backfill"], settings,
                                            TALLY_CRASH_AT="backfill_after_chunk", TALLY_METERS_BACKFILL_CHUNK="20")
        assert code == -9, out
        with running("processor-c", ["process"], settings):  # a member joins: a rebalance during the backfill
            await _flow(settings, [a, b], range(16, 22), base, now)
            await backfilled(settings, db, a, ids, TALLY_METERS_BACKFILL_CHUNK="20")
            await wait_for(lambda: drained(settings, db), 90, "the processors")
    await _assert_exact(db, a, b, {slug: slug for slug in DEFINITIONS})


async def test_a_new_version_fills_exactly_and_the_old_one_stops_where_it_took_over(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings, a, b, base, now = _setting_out(isolated)
    with running("processor-a", ["process"], settings), running("processor-b", ["process"], settings):
        await _flow(settings, [a, b], range(0, 6), base, now)
        v1 = await new_version(db, a, "tokens", 1, DEFINITIONS["tokens"])
        await _flow(settings, [a, b], range(6, 10), base, now)
        await wait_for(lambda: drained(settings, db), 90, "the processors")
        await backfilled(settings, db, a, [v1])
        v2 = await new_version(db, a, "tokens", 2, {**DEFINITIONS["tokens"], "windows": ["day"]})
        await _flow(settings, [a, b], range(10, 16), base, now)
        await wait_for(lambda: drained(settings, db), 90, "the processors")
        await backfilled(settings, db, a, [v2])
    rows = await _stored(db, a)
    starts = {r["kafka_partition"]: r["start_offset"] for r in await db.fetch(
        "select kafka_partition, start_offset from meter_starts where tenant = $1 and version_id = $2", a, v2)}
    before = [r for r in rows if r["kafka_offset"] < starts[r["kafka_partition"]]]
    assert 0 < len(before) < len(rows)
    assert await counters_of(db, a, "tokens") == expected_windows(before, "tokens")  # v1 stopped at v2's starts
    day = {k: v for k, v in expected_windows(rows, "tokens").items() if k[0] == "day"}
    assert await counters_of(db, a, "tokens@2") == day  # v2 counts everything, its own windows
