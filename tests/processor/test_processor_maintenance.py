"""`tally maintenance`: a partition for every month that holds events (nothing left in the default
partition), event keys pruned by age, counter windows pruned by window size, their queue entries and distinct
values too, and WEIGHTED_SUM level changes once no window kept can need them."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import asyncpg

from tally.meters import stateful
from tally.meters.definitions import Meter, MetersConfig, Window
from tally.meters.meterset import MeterSet
from tally.meters.unique import window_id
from tally.meters.windows import bounds
from tally.meters.weighted import series_text, weighted_sum_over
from tally.schemas.counters import Aggregation
from tally.settings import Settings
from tally.sinks.base import Event, Record
from tests.metering.meters_helpers import DEFINITIONS, new_version
from tests.processor.helpers import maintenance, wait_for
from tests.support import running


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

    out = maintenance(settings, TALLY_EVENT_KEYS_RETENTION_DAYS="30")
    assert "event keys pruned: 1" in out and "1 minute" in out, out

    assert await db.fetchval("select to_regclass('events_y2001m03') is not null")
    assert await db.fetchval("select count(*) from events_default") == 0
    assert await db.fetchval("select count(*) from events_y2001m03 where tenant = $1", tenant) == 1
    assert [r[0] for r in await db.fetch("select id from event_keys where tenant = $1", tenant)] == ["fresh"]
    kept = {r[0] for r in await db.fetch("select window_name from counters where tenant = $1", tenant)}
    assert kept == {"hour", "day"}  # hours are kept 400 days, days for ever
    assert await db.fetchval("select count(*) from counter_outbox where key = $1", f"{tenant}/minute") == 0


async def test_a_pruned_window_takes_its_distinct_values_and_no_other_window_loses_any(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """Two tenants, each with a UNIQUE_COUNT minute window past its retention and one kept; the first tenant's
    pruned window holds more values than a batch, and the second tenant's kept window has the same key text
    (so the same window id) as the first tenant's pruned one."""
    a, b = (f"upkeep-{uuid.uuid4().hex[:8]}" for _ in range(2))
    now = datetime.now(timezone.utc)
    old, recent = now - timedelta(days=40), now - timedelta(days=2)
    windows = {(a, "old"): (old, 12_001), (a, "kept"): (recent, 3), (b, "old"): (old, 2), (b, f"{a}/old"): (recent, 4)}
    for (tenant, name), (end, n) in windows.items():
        key = name if name.startswith(a) else f"{tenant}/{name}"
        await db.execute("insert into counters (key, tenant, meter, aggregation, window_name, window_start, window_end,"
                         " value, count, latest_time) values ($1, $2, 'users', 'UNIQUE_COUNT', 'minute', $3, $4, $5,"
                         " $6, $3)", key, tenant, end - timedelta(minutes=1), end, n, n)
        await db.execute("insert into counter_distinct (tenant, window_id, hash) select $1, $2, h"
                         " from generate_series(1, $3::int) h", tenant, window_id(key), n)

    out = maintenance(settings)
    assert "counter windows pruned: 2 minute" in out and "distinct values pruned: 12003;" in out, out
    assert {tuple(r) for r in await db.fetch("select tenant, key from counters where tenant = any($1)", [a, b])} == {
        (a, f"{a}/kept"), (b, f"{a}/old")}
    left = await db.fetch("select tenant, window_id, count(*) from counter_distinct where tenant = any($1)"
                          " group by 1, 2", [a, b])
    assert {(r[0], bytes(r[1])): r[2] for r in left} == {(a, window_id(f"{a}/kept")): 3, (b, window_id(f"{a}/old")): 4}


async def test_level_changes_go_once_no_window_kept_can_need_them(settings: Settings, db: asyncpg.Connection) -> None:
    """With every window size pruned after 800 days, per series: the changes before the UTC month holding the latest
    change before the cutoff go, but the last of them (the level carried into that month). Two tenants pruned alike;
    a series whose level was set once, one with no change before the cutoff and a tenant whose backfill is not done
    keep all; the integral from that month on is the same as before, and so is what a new change integrates again."""
    a, b, backfilling = (f"upkeep-{uuid.uuid4().hex[:8]}" for _ in range(3))
    now = datetime.now(timezone.utc)
    cutoff = now - timedelta(days=800)
    month = (cutoff - timedelta(days=40)).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    layout = [("x", month - timedelta(days=70)), ("b1", month - timedelta(days=20)), ("b2", month - timedelta(days=20)),
              ("d", month + timedelta(days=1)), ("p", month + timedelta(days=5)), ("e", now - timedelta(days=1))]
    rows = [(t, series_text(t, "storage", None, {}), at, name, level)
            for t in (a, b, backfilling) for level, (name, at) in enumerate(layout, 1)]
    rows += [(a, series_text(a, "storage", "once", {}), month - timedelta(days=100), "x", 7),
             (a, series_text(a, "storage", "new", {}), now - timedelta(days=3), "x", 8),
             (b, series_text(a, "storage", None, {}), month - timedelta(days=70), "x", 9)]  # a's series text, b's own
    await db.executemany("insert into weighted_points (tenant, series, at, source, id, level)"
                         " values ($1, $2, $3, 's', $4, $5)", rows)
    await new_version(db, backfilling, "seats", 1, DEFINITIONS["seats"])
    before = await weighted_sum_over(db, a, "storage", None, {}, month, now)

    async def kept() -> list[asyncpg.Record]:
        return await db.fetch("select tenant, series, id from weighted_points where tenant = any($1)"
                              " order by tenant, series, at, id", [a, b, backfilling])

    everything = await kept()
    assert "weighted points pruned: 0;" in maintenance(settings)  # day and month windows are kept for ever
    assert await kept() == everything

    out = maintenance(settings, TALLY_COUNTER_RETENTION_DAY_DAYS="800", TALLY_COUNTER_RETENTION_MONTH_DAYS="800")
    assert "weighted points pruned: 4;" in out, out
    gone = {(t, series_text(t, "storage", None, {}), name) for t in (a, b) for name in ("x", "b1")}
    assert [tuple(r) for r in await kept()] == [tuple(r) for r in everything if tuple(r) not in gone]
    assert await weighted_sum_over(db, a, "storage", None, {}, month, now) == before

    # A change now, after a quiet series' last one before the cutoff: pruned (a) or not (the backfilling tenant),
    # it integrates the windows of every size holding that last change again to the same figures.
    quiet = [r for r in rows if r[0] in (a, backfilling) and r[3] != "e" and r[1].endswith("null,{}]")]
    await db.executemany("insert into weighted_points (tenant, series, at, source, id, level)"
                         " values ($1, replace($2, 'storage', 'quiet'), $3, 's', $4, $5)", quiet)
    assert "weighted points pruned: 2;" in maintenance(settings, TALLY_COUNTER_RETENTION_DAY_DAYS="800",
                                                       TALLY_COUNTER_RETENTION_MONTH_DAYS="800")
    meter = Meter(slug="quiet", event_type="disk.level", aggregation=Aggregation.WEIGHTED_SUM, value_path="data.gb",
                  unit="hour", per_subject=False, windows=tuple(Window))
    figures = {}
    for tenant in (a, backfilling):
        change = Event(tenant, "s", "now", "disk.level", None, now - timedelta(hours=1), now, {"gb": 10})
        async with db.transaction():
            deltas = await stateful.apply(MeterSet(MetersConfig(meters=[meter])), db, [Record(change, 0, 0)])
        figures[tenant] = {(d.key.window, d.key.window_start): (d.value, d.total, d.level, d.integrated_until)
                           for _, d in deltas}
    assert figures[a] == figures[backfilling]
    assert {start for window, start in figures[a] if window == "month"} == {
        month, bounds(Window.MONTH, change.time)[0]}  # the month of the last change before the cutoff, and now's


async def test_a_processor_looks_after_storage_as_it_starts(isolated: Settings, db: asyncpg.Connection) -> None:
    """At start, whatever the host's uptime (it used to wait six hours from boot)."""
    tenant = f"upkeep-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    await db.execute("insert into events (tenant, source, id, type, time, received_at, kafka_partition, kafka_offset)"
                     " values ($1, 's', 'old', 't', $2, $3, 0, 0)", tenant, datetime(2002, 7, 1, tzinfo=timezone.utc), now)
    with running("processor", ["process"], isolated):
        await wait_for(lambda: db.fetchval("select to_regclass('events_y2002m07') is not null"), 30,
                       "the processor to partition the backfilled month")
