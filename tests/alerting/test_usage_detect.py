"""Billing review L2: a threshold crossed only by events processed after the period ended is still recorded
(the previous period is read while late events can count into it)."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta, timezone

import asyncpg

from tally.meters.catalog import Catalog
from tally.meters.definitions import DEFAULT_METERS
from tally.schemas.envelope import Envelope
from tally.settings import Settings
from tests.alerting.test_evaluator import processed
from tests.metering.helpers import metered
from tally.usage.alerts import detect
from tally.usage.plans import Plan, PlanMeter, Subscription, save_plan, subscribe
from tally.usage.windows import WindowReader


async def test_late_events_that_cross_a_threshold_of_the_ended_period_alert(
        alone: Settings, alone_db: asyncpg.Connection) -> None:
    db, tenant = alone_db, f"t-{uuid.uuid4().hex[:8]}"
    settings = metered(alone)
    now = datetime.now(timezone.utc)
    today = now.date()
    await save_plan(db, tenant, Plan(id="p", meters=[PlanMeter(meter="api_calls", included=10, thresholds=[80])]))
    # Anchored on today: the previous period ended at today's midnight (UTC).
    await subscribe(db, tenant, Subscription(subject="s1", plan_id="p", anchor_day=today.day,
                                             start_date=today - timedelta(days=90)))
    ended = datetime(today.year, today.month, today.day, tzinfo=timezone.utc)
    late = [Envelope(id=f"late-{n}", source="app", type="api.call", subject="s1", time=ended - timedelta(minutes=30),
                     received_at=now, data={}, tenant=tenant) for n in range(9)]
    await processed(settings, db, late)
    pool = await asyncpg.create_pool(alone.database_url, min_size=1, max_size=2)
    try:
        reader = WindowReader(pool, None, settings.redis_prefix, settings.redis_counter_ttl_s)
        catalog = Catalog(DEFAULT_METERS)
        await catalog.refresh(pool)
        assert await detect(pool, reader, catalog, 86400, now) == 1
        assert await detect(pool, reader, catalog, 86400, now) == 0
    finally:
        await pool.close()
    row = await db.fetchrow("select period_label, period_end, threshold, used from usage_alerts where tenant = $1",
                            tenant)
    assert (row["period_end"], row["threshold"], row["used"]) == (ended, 80, 9)
    assert row["period_label"] < today and isinstance(row["period_label"], date)
