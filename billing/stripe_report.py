"""Stripe usage reporting: each subscription's billable quantity as Billing Meter Events.

Rows first, then sending (docs/adr/0044). A run (1) re-sends every row not yet sent, (2) writes a row
for each (subscription, meter, period) whose billable quantity (overage, or usage for plans that
report usage) grew past what its rows already hold, with the difference as its value, and (3) sends
the new rows. A row's identifier is fixed when it is written and doubles as the Idempotency-Key, so a
crash or timeout at any point re-sends the same identifier with the same value and Stripe keeps one.
Transient failures are retried (tenacity); after repeated failures a circuit breaker (pybreaker)
opens and the remaining rows are recorded `deferred` for the next run instead of hammering Stripe.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pybreaker
import stripe
import tenacity

from billing.context import BillingConfig, JobContext
from usage.periods import Period, PeriodError, period_at, previous
from usage.plans import Subscription, load_subscriptions
from usage.terms import terms_for
from usage.windows import from_postgres

log = logging.getLogger("tally.billing.stripe")

PERMANENT = (stripe.InvalidRequestError, stripe.AuthenticationError, stripe.PermissionError)


def identifier(tenant: str, subject: str, meter: str, label: str, seq: int) -> str:
    """Stable and short (Stripe allows 100 characters): the same row always sends the same identifier."""
    digest = hashlib.sha256(f"{tenant}\x1f{subject}\x1f{meter}\x1f{label}\x1f{seq}".encode()).hexdigest()[:40]
    return f"tally_{digest}"


class StripeSender:
    """Sends one row at a time through tenacity retries inside a process-wide circuit breaker."""

    def __init__(self, config: BillingConfig) -> None:
        self._client = stripe.StripeClient(config.stripe_api_key, base_addresses={"api": config.stripe_api_base},
                                           max_network_retries=0)
        self.breaker = pybreaker.CircuitBreaker(fail_max=config.stripe_breaker_fail_max,
                                                reset_timeout=config.stripe_breaker_reset_s, exclude=list(PERMANENT))
        self._retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(config.stripe_max_attempts),
            wait=tenacity.wait_exponential(multiplier=0.2, max=5),
            retry=tenacity.retry_if_not_exception_type(PERMANENT), reraise=True)

    def send(self, row: asyncpg.Record) -> None:
        self.breaker.call(self._retrying, self._create, row)

    def _create(self, row: asyncpg.Record) -> None:
        self._client.v1.billing.meter_events.create(
            params={"event_name": row["event_name"], "identifier": row["identifier"],
                    "timestamp": int(row["event_time"].timestamp()),
                    "payload": {"stripe_customer_id": row["stripe_customer_id"], "value": str(row["value"])}},
            options={"idempotency_key": row["identifier"]})


_PLAN_ROW = """
insert into stripe_reports (identifier, tenant, subject, meter, period_label, period_end, seq, kind, event_name,
                            stripe_customer_id, value, event_time)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
"""


async def _plan_period(conn: asyncpg.Connection, tenant: str, sub: Subscription, period: Period, now: datetime,
                       closed: bool) -> int:
    terms = await terms_for(conn, tenant, sub.subject, period)
    if terms is None:
        return 0
    windows = await from_postgres(conn, tenant, sub.subject, terms.meters(), period.start, period.end)
    written = 0
    for pm in (terms.meter(meter)[1] for meter in terms.meters()):
        quantity = terms.billable(pm.meter, windows[pm.meter])
        async with conn.transaction():
            await conn.execute("select pg_advisory_xact_lock(4001, hashtext($1))",
                               f"{tenant}\x1f{sub.subject}\x1f{pm.meter}\x1f{period.label}")
            reported, last = await conn.fetchrow(
                "select coalesce(sum(value), 0), coalesce(max(seq), 0) from stripe_reports"
                " where tenant = $1 and subject = $2 and meter = $3 and period_label = $4",
                tenant, sub.subject, pm.meter, period.label)
            if quantity < reported:
                log.warning("%s/%s %s %s: %s reported, only %s billable now (not taken back)", tenant, sub.subject,
                            pm.meter, period.label, reported, quantity)
            if quantity <= reported:
                continue
            seq = last + 1
            # After close, a late difference goes into the next invoice as an adjustment (docs/adr/0043).
            event_time = now if closed else min(now, period.end - timedelta(seconds=1))
            await conn.execute(_PLAN_ROW, identifier(tenant, sub.subject, pm.meter, str(period.label), seq), tenant,
                               sub.subject, pm.meter, period.label, period.end, seq,
                               "adjustment" if closed else "usage", pm.stripe_event or pm.meter,
                               sub.stripe_customer_id, quantity - reported, event_time)
            written += 1
    return written


async def plan_reports(ctx: JobContext, now: datetime, periods: str = "current and previous") -> int:
    """Write a row for every billable quantity not yet covered by rows; returns how many were written."""
    written = 0
    async with ctx.pool.acquire() as conn:
        closed = {(r["tenant"], r["subject"], r["period_label"]) for r in await conn.fetch(
            "select distinct tenant, subject, period_label from period_usage")}
        for tenant, sub in await load_subscriptions(conn, None):
            if not sub.stripe_customer_id:
                continue
            try:
                current = period_at(sub.anchor(), now)
            except PeriodError:
                continue
            wanted = [current]
            if periods == "current and previous" and current.label > sub.start_date:
                wanted.append(previous(sub.anchor(), current))
            for period in wanted:
                written += await _plan_period(conn, tenant, sub, period, now,
                                              (tenant, sub.subject, period.label) in closed)
    return written


async def send_unsent(ctx: JobContext, sender: StripeSender, hook: Callable[[str], None]) -> dict[str, int]:
    """Send every row not sent yet, oldest first; returns how many ended in each status.

    `hook` is the tests' crash hook, called before each send and after a send succeeded."""
    rows = await ctx.pool.fetch("select * from stripe_reports where status in ('pending', 'deferred') order by id")
    outcome = {"sent": 0, "deferred": 0, "failed": 0}
    breaker_open = False
    for row in rows:
        status, error, tried = "deferred", None, not breaker_open
        if tried:
            hook("report_before_send")
            try:
                await asyncio.to_thread(sender.send, row)
                hook("report_after_send")
                status = "sent"
            except pybreaker.CircuitBreakerError as exc:
                error, breaker_open = f"circuit open: {exc}", True
            except PERMANENT as exc:
                status, error = "failed", f"{type(exc).__name__}: {exc}"
            except (stripe.StripeError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        else:
            error = "circuit open: not tried"
        await ctx.pool.execute(
            "update stripe_reports set status = $2, error = $3, attempts = attempts + $4,"
            " sent_at = case when $2 = 'sent' then now() end where id = $1",
            row["id"], status, error, int(tried))
        outcome[status] += 1
    return outcome


async def report(ctx: JobContext, sender: StripeSender, now: datetime, hook: Callable[[str], None]) -> dict[str, Any]:
    """One reporting run: rows for what grew, then every row not yet sent (this run's and earlier ones)."""
    written = await plan_reports(ctx, now)
    return {"rows_written": written, **await send_unsent(ctx, sender, hook), "breaker": sender.breaker.current_state}
