"""One tenant's stored events that its new meter cannot read (a SUM whose value is text) never stop the shared
backfill: they are left out, as the live processor would dead-letter them rather than count them, the tenant's other
events are counted, and another tenant's backfill behind it in the queue completes. The daily reconcile, which recounts
the same stored events, leaves them out the same way rather than failing for every tenant."""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from tally.billing.context import BillingConfig, JobContext
from tally.billing.reconcile import reconcile
from tally.meters.definitions import load_meters
from tally.schemas.envelope import Envelope
from tally.settings import Settings
from tests.metering.meters_helpers import (DEFINITIONS, backfilled, counters_of, events_for, expected_windows,
                                           meter_test, new_version)
from tests.processor.helpers import drained, produce, wait_for
from tests.support import running


async def test_unreadable_stored_events_are_left_out_and_stop_no_other_backfill(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings, a, base, now = meter_test(isolated)
    b = f"b{a[1:]}"
    hostile = [Envelope(id=f"bad-{i}", source="app", type="llm.call", subject="s1", time=base + timedelta(minutes=i),
                        received_at=now, data={"tokens": "lots"}, tenant=a) for i in range(5)]
    with running("processor", ["process"], settings):  # deploy-time meters only: every event is stored
        produce(settings, events_for(a, base, now, 60) + hostile + events_for(b, base, now, 60))
        await wait_for(lambda: drained(settings, db), 90, "the processor")
        ids_a = [await new_version(db, a, "tokens", 1, DEFINITIONS["tokens"])]
        ids_b = [await new_version(db, b, "tokens", 1, DEFINITIONS["tokens"])]
        await backfilled(settings, db, a, ids_a + ids_b)
        await backfilled(settings, db, b, ids_b)
    readable = [r for r in await db.fetch("select type, subject, time, data::text as data from events where tenant = $1"
                                          " and id not like 'bad-%'", a)]
    assert await counters_of(db, a, "tokens") == expected_windows(readable, "tokens")
    rows_b = await db.fetch("select type, subject, time, data::text as data from events where tenant = $1", b)
    assert await counters_of(db, b, "tokens") == expected_windows(rows_b, "tokens")
    config = BillingConfig(settings.database_url, settings.redis_url, settings.redis_prefix,
                           settings.redis_counter_ttl_s, load_meters(inline=""))
    ctx = await JobContext.open(config)
    try:
        report = await reconcile(ctx, base, tenant=a)
    finally:
        await ctx.close()
    assert report.drift == [] and report.skipped == [] and report.windows > 0
