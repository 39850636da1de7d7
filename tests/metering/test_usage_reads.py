"""Settled windows are folded and kept in memory; the figures and the days are the same as when every
window is read one by one. (The windows are written straight into PostgreSQL, so both read it alone.)"""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import asyncpg

from tally.schemas.counters import CounterKey
from tally.settings import Settings
from tally.usage.figures import UsageService
from tally.usage.plans import Plan, PlanMeter, Subscription, save_plan, subscribe
from tally.usage.windows import WindowReader


async def test_folded_settled_windows_give_the_same_usage_and_history(settings: Settings,
                                                                      db: asyncpg.Connection) -> None:
    tenant, subject = f"reads-{uuid.uuid4().hex[:8]}", "acme"
    await save_plan(db, tenant, Plan(id="p", meters=[PlanMeter(meter="tokens", included=100)]))
    await subscribe(db, tenant, Subscription(subject=subject, plan_id="p", anchor_day=1, time_zone="America/Chicago",
                                             start_date=date.today() - timedelta(days=60)))
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    rows = []
    for h in range(1, 24 * 5, 7):  # one window every 7 hours over the last five days
        start = now - timedelta(hours=h)
        key = CounterKey(tenant, "tokens", "hour", start, subject, ()).to_text()
        rows.append((key, tenant, "tokens", "SUM", "hour", start, start + timedelta(hours=1), subject, "{}",
                     Decimal(h) / 4, h, start))
    await db.executemany(
        "insert into counters (key, tenant, meter, aggregation, window_name, window_start, window_end, subject, grp,"
        " value, count, latest_time) values ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12)", rows)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        folded = UsageService(pool, WindowReader(pool, None, settings.redis_prefix, settings.redis_counter_ttl_s))
        one_by_one = UsageService(pool, WindowReader(pool, None, settings.redis_prefix, settings.redis_counter_ttl_s,
                                                     settle_s=10**9))
        for spec in ("current", "previous"):
            usage = await folded.usage(tenant, subject, spec=spec)
            assert usage == await one_by_one.usage(tenant, subject, spec=spec)
            assert await folded.usage(tenant, subject, spec=spec) == usage  # from memory now
            assert await folded.history(tenant, subject, spec=spec) == await one_by_one.history(tenant, subject,
                                                                                                spec=spec)
        both = [await folded.usage(tenant, subject, spec=s) for s in ("current", "previous")]
        assert sum(Decimal(u["meters"][0]["used"]) for u in both) == sum(r[9] for r in rows)
    finally:
        await pool.close()
