"""Period close: once a period's end plus the grace (the late-event horizon) has passed, its usage is
frozen as `period_usage` rows, after a last Stripe report for it (docs/adr/0043).

The grace is at least `TALLY_LATE_HORIZON_S` (both one day by default): no event received later than that after its
event time is counted, so after end + grace no event the gateway receives can change the period.
One that was received in time but processed later (a backlog) still changes the live counters; the
next Stripe report sends the difference as an adjustment, and reconciliation shows it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from billing.context import JobContext
from usage.periods import Period, PeriodError, period_at, previous
from usage.plans import Subscription, load_subscriptions, plan_for_period
from usage.windows import combine, from_postgres

MAX_BACK = 12  # periods looked back per subscription, for a worker that was down a long time


def due(sub: Subscription, now: datetime, grace: timedelta, closed: set) -> list[Period]:
    """The subscription's periods past end + grace that are not closed yet, oldest first."""
    out: list[Period] = []
    try:
        period = period_at(sub.anchor(), now)
    except PeriodError:
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


async def close_periods(ctx: JobContext, now: datetime) -> dict[str, Any]:
    grace = timedelta(seconds=ctx.config.close_grace_s)
    closed_now = 0
    async with ctx.pool.acquire() as conn:
        for tenant, sub in await load_subscriptions(conn, None):
            closed = {r["period_label"] for r in await conn.fetch(
                "select distinct period_label from period_usage where tenant = $1 and subject = $2",
                tenant, sub.subject)}
            for period in due(sub, now, grace, closed):
                plan = await plan_for_period(conn, tenant, sub.subject, period.end)
                if plan is None:
                    continue
                windows = await from_postgres(conn, tenant, sub.subject, [m.meter for m in plan.meters],
                                              period.start, period.end)
                async with conn.transaction():
                    for pm in plan.meters:
                        used = combine(list(windows[pm.meter].values()))
                        await conn.execute(
                            "insert into period_usage (tenant, subject, meter, period_label, period_start, period_end,"
                            " plan_id, used, included, overage) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                            " on conflict do nothing",
                            tenant, sub.subject, pm.meter, period.label, period.start, period.end, plan.id, used,
                            pm.included, max(used - pm.included, 0))
                closed_now += 1
    return {"periods_closed": closed_now}
