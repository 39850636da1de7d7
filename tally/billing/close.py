"""Period close: once a period's end plus the grace (the late-event horizon) has passed, its usage is
frozen as `period_usage` rows, after a last Stripe report for it (docs/adr/0043).

The grace is at least `TALLY_LATE_HORIZON_S` (both one day by default): no event received later than that after its
event time is counted, so after end + grace no event the gateway receives can change the period.
One that was received in time but processed later (a backlog) still changes the live counters; the
next Stripe report sends the difference as an adjustment, and reconciliation shows it.

Each row records the plan version in force at the period's end; the period's terms come from the plan
and subscription history (`tally.usage.terms`), which no later change reaches (docs/adr/0060). A subscription
whose periods cannot be computed is logged, counted and skipped; the others are closed.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from tally.billing.context import JobContext
from tally.meters.catalog import Catalog
from tally.usage.periods import NotStarted, Period, PeriodError, period_at, previous, skipped
from tally.usage.plans import Subscription, load_subscriptions
from tally.usage.terms import terms_for
from tally.usage.windows import combine, from_postgres

log = logging.getLogger("tally.billing.close")

MAX_BACK = 12  # periods looked back per subscription, for a worker that was down a long time


def due(sub: Subscription, now: datetime, grace: timedelta, closed: set) -> list[Period]:
    """The subscription's periods past end + grace that are not closed yet, oldest first."""
    out: list[Period] = []
    try:
        period = period_at(sub.anchor(), now)
    except NotStarted:
        return out
    for _ in range(MAX_BACK):
        if period.label <= sub.start_date:
            break
        period = previous(sub.anchor(), period)
        if period.end + grace > now:
            continue
        if period.label in closed:
            break
        out.append(period)
    return out[::-1]


async def _close(conn: asyncpg.Connection, catalog: Catalog, tenant: str, sub: Subscription, period: Period) -> bool:
    """Freeze the period, unless a meter of it is still backfilling: its figure is not whole yet (ADR 0140)."""
    terms = await terms_for(conn, tenant, sub.subject, period)
    if terms is None:
        return False
    waiting = catalog.backfilling(tenant) & set(terms.meters())
    if waiting:
        log.info("%s/%s: period %s not closed while %s backfill", tenant, sub.subject, period.label,
                 ", ".join(sorted(waiting)))
        return False
    windows = await from_postgres(conn, tenant, sub.subject, terms.meters(), period.start, period.end,
                                  catalog.counters(tenant, terms.meters()))
    async with conn.transaction():
        for meter in terms.meters():
            segment, pm = terms.meter(meter)
            await conn.execute(
                "insert into period_usage (tenant, subject, meter, period_label, period_start, period_end,"
                " plan_id, plan_version, used, included, overage)"
                " values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) on conflict do nothing",
                tenant, sub.subject, meter, period.label, period.start, period.end, segment.plan.id, segment.version,
                combine(list(windows[meter].values())), pm.included, terms.overage(meter, windows[meter]))
    return True


async def close_periods(ctx: JobContext, now: datetime) -> dict[str, Any]:
    grace = timedelta(seconds=ctx.config.close_grace_s)
    closed_now = 0
    catalog = await ctx.catalog()
    async with ctx.pool.acquire() as conn:
        for tenant, sub in await load_subscriptions(conn, None):
            closed = {r["period_label"] for r in await conn.fetch(
                "select distinct period_label from period_usage where tenant = $1 and subject = $2",
                tenant, sub.subject)}
            try:
                for period in due(sub, now, grace, closed):
                    closed_now += await _close(conn, catalog, tenant, sub, period)
            except PeriodError as exc:
                skipped("close", tenant, sub.subject, exc)
    return {"periods_closed": closed_now}
