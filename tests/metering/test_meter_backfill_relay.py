"""The backfill's relay fails once (Kafka unreachable as the finished backfill publishes): the run is failed with the
backfill done, its counters in PostgreSQL and queued in the outbox. With no processor running, the next
`tally jobs run meters_backfill`, which has nothing left to count, publishes them: the counter topic catches up
without waiting for a processor's idle relay."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import asyncpg

from tally import wiring
from tally.billing.context import JobContext
from tally.billing.jobs import run_job
from tally.billing.registry import METERS_BACKFILL
from tally.settings import Settings
from tests.metering.helpers import run_tally
from tests.metering.meters_helpers import DEFINITIONS, counters_of, events_for, meter_test, new_version
from tests.processor.helpers import assert_topic_matches_postgres, drained, produce, wait_for
from tests.support import running

_NO_BROKER = "127.0.0.1:1"  # nothing listens: every message the relay produces times out


async def test_the_next_backfill_run_publishes_what_a_failed_relay_left_queued(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings, tenant, base, now = meter_test(isolated)
    with running("processor", ["process"], settings):
        produce(settings, events_for(tenant, base, now, 60))
        await wait_for(lambda: drained(settings, db), 90, "the processor")
    code, out = run_tally(["jobs", "run", "meters_backfill"], settings)  # versions other tests left go first
    assert code == 0, out

    vid = await new_version(db, tenant, "calls", 1, DEFINITIONS["calls"])
    config = wiring.billing(settings)
    ctx = await JobContext.open(dataclasses.replace(config, kafka_bootstrap=_NO_BROKER))  # the relay's broker only
    try:
        result = await run_job(ctx, METERS_BACKFILL, "relay-fails", datetime.now(timezone.utc), force=True)
    finally:
        await ctx.close()
    assert result.status == "failed", result
    assert await db.fetchval("select state from meter_backfills where tenant = $1 and version_id = $2",
                             tenant, vid) == "done"
    assert await counters_of(db, tenant, "calls")
    queued = "select count(*) from counter_outbox o join counters c using (tenant, key) where c.tenant = $1"
    assert await db.fetchval(queued, tenant) > 0

    code, out = run_tally(["jobs", "run", "meters_backfill"], settings)
    assert code == 0, out
    assert await db.fetchval(queued, tenant) == 0, out
    assert await assert_topic_matches_postgres(settings, db, tenant, "calls") > 0
