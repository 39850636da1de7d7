"""A deploy may add a meter whose slug a tenant already defined (the meters API refuses only the slugs deployed at the
time). For that tenant its own meter keeps meaning what its bills and limits were made from, and the deploy-time one
counts for everyone else: nothing is counted twice into one counter, no read fails, and the recount agrees (ADR 0153)."""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import asyncpg
import pytest

from tally.billing.context import BillingConfig, JobContext
from tally.billing.reconcile import _Recount, _Scope, reconcile
from tally.meters.catalog import Catalog
from tally.meters.definitions import Window, load_meters
from tally.meters.meterset import MeterSet
from tally.settings import Settings
from tally.meters.windows import bounds
from tests.metering.helpers import METERS
from tests.metering.meters_helpers import backfilled, counters_of, events_for, expected_windows, meter_test, new_version
from tests.processor.helpers import drained, produce, wait_for
from tests.support import running

OWN_TOKENS = {"event_type": "llm.call", "aggregation": "COUNT", "windows": ["hour", "day"]}


async def test_a_tenants_own_meter_shadows_a_deploy_time_meter_of_its_slug(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings, a, base, now = meter_test(isolated, meters=METERS)
    b = f"b{a[1:]}"
    vid = await new_version(db, a, "tokens", 1, OWN_TOKENS)
    await backfilled(settings, db, a, [vid])
    with running("processor", ["process"], settings):
        produce(settings, events_for(a, base, now, 60) + events_for(b, base, now, 60))
        await wait_for(lambda: drained(settings, db), 90, "the processor")

    columns = "select type, subject, time, data::text as data from events where tenant = $1"
    calls: dict[tuple[str, object, str], Decimal] = defaultdict(Decimal)
    for r in await db.fetch(columns, a):
        if r["type"] == "llm.call":
            for name in OWN_TOKENS["windows"]:
                calls[(name, bounds(Window(name), r["time"])[0], r["subject"])] += 1
    assert calls and await counters_of(db, a, "tokens") == dict(calls), "tenant a's own COUNT, alone"
    assert await counters_of(db, b, "tokens") == expected_windows(await db.fetch(columns, b), "tokens")

    meters = load_meters(inline=METERS)
    catalog = Catalog(meters)
    await catalog.refresh(db)
    assert [m.aggregation.value for m in catalog.readable(a).meters if m.slug == "tokens"] == ["COUNT"]
    assert [m.aggregation.value for m in catalog.readable(b).meters if m.slug == "tokens"] == ["SUM"]

    config = BillingConfig(settings.database_url, settings.redis_url, settings.redis_prefix,
                           settings.redis_counter_ttl_s, meters)
    ctx = await JobContext.open(config)
    try:
        for tenant in (a, b):
            report = await reconcile(ctx, base, tenant=tenant)
            assert report.drift == [] and report.windows > 0, (tenant, report.drift[:3])
    finally:
        await ctx.close()


async def test_a_clash_is_logged_once_by_the_process_and_again_when_it_changes(
        db: asyncpg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    tenant, other = (f"t-{uuid.uuid4().hex[:8]}" for _ in range(2))
    caplog.set_level(logging.WARNING, logger="tally.meters")
    await new_version(db, tenant, "tokens", 1, OWN_TOKENS)
    catalog = Catalog(load_meters(inline=METERS))
    assert await catalog.refresh(db)
    await new_version(db, other, "own", 1, OWN_TOKENS)  # the catalog moves
    assert await catalog.refresh(db)
    assert await Catalog(load_meters(inline=METERS)).refresh(db)  # another catalog of the process
    told = [r.getMessage() for r in caplog.records if tenant in r.getMessage()]
    assert told == [f"tenant {tenant} defined its own tokens before the deploy did: its own stays its meter (ADR 0153)"]

    await new_version(db, tenant, "api_calls", 1, {**OWN_TOKENS, "event_type": "api.call"})
    assert await catalog.refresh(db)
    told = [r.getMessage() for r in caplog.records if tenant in r.getMessage()]
    assert len(told) == 2 and "its own api_calls, tokens before" in told[1], told


async def test_the_shared_recount_reads_no_event_of_a_tenant_it_leaves_out(db: asyncpg.Connection) -> None:
    """The deploy-time meters' recount over every tenant leaves the shadowing tenants out in its query, not after
    reading their events."""
    shadowing, other = (f"t-{uuid.uuid4().hex[:8]}" for _ in range(2))
    now = datetime.now(timezone.utc)
    await db.executemany("insert into events (tenant, source, id, type, time, received_at, kafka_partition,"
                         " kafka_offset, data) values ($1, 'app', $2, 'llm.call', $3, $3, 0, $4, '{\"tokens\": 2}')",
                         [(t, f"e-{i}", now - timedelta(minutes=30, seconds=i), i) for t in (shadowing, other)
                          for i in range(3)])
    recount = _Recount(_Scope(MeterSet(load_meters(inline=METERS)), None, leave_out=frozenset({shadowing})))
    read: list[str] = []
    fold = recount._fold

    def reading(rows: list[asyncpg.Record]) -> None:
        read.extend(r["tenant"] for r in rows)
        fold(rows)

    recount._fold = reading
    async with db.transaction(isolation="repeatable_read", readonly=True):
        await recount.read(db, now - timedelta(hours=1), now, None)
    assert read.count(other) == 3 and shadowing not in read
    assert {d.key.tenant for d in recount.windows.values()} >= {other}
    assert all(d.key.tenant != shadowing for d in recount.windows.values())
