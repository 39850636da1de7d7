"""Stripe usage reporting: each subscription's billable quantity as Billing Meter Events, under Stripe's
documented rules (docs/adr/0044, 0065, 0066).

Rows first, then sending. A run (1) writes, per (subscription, meter, period), a row for the whole
units its billable quantity grew past what its rows already hold, takes back what fell (a cancel
within Stripe's 24 h, else a credit carried to the next period) and carries a finished period's
fractional remainder to the next one; (2) sends every row not yet sent, one sender at a time.

What Stripe allows, held here: `value` whole numbers; an identifier (and an Idempotency-Key)
remembered for 24 h, so a row that may have reached Stripe is re-sent only within 24 h of its first
send and is otherwise `held` for a person to resolve; a cancel within 24 h of Stripe receiving the
event; an event stamped in a finished period only until the invoice's finalisation grace ends, after
which the difference is an `adjustment` stamped now (the next invoice) that names its period; a
timestamp at most 35 days old. A row Stripe refused (4xx) is `failed`: it counts as nothing billed and
blocks its key until `tally billing retry`. Each row goes to its tenant's own Stripe account.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import asyncpg
import pybreaker
import stripe
import tenacity
from prometheus_client import Counter

from tally.billing import metrics
from tally.billing.accounts import accounts
from tally.billing.context import BillingConfig, JobContext
from tally.meters.catalog import Catalog
from tally.usage.periods import Period, PeriodError, period_at, previous
from tally.usage.plans import Subscription, load_subscriptions
from tally.usage.terms import terms_for
from tally.usage.windows import from_postgres

log = logging.getLogger("tally.billing.stripe")

PERMANENT = (stripe.InvalidRequestError, stripe.AuthenticationError, stripe.PermissionError)
OUTAGES = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)

# Stripe's documented windows (docs/adr/0065).
IDENTIFIER_WINDOW = timedelta(hours=24)  # identifiers and Idempotency-Keys: "a rolling period of at least 24 hours"
CANCEL_WINDOW = timedelta(hours=24)  # adjustments: "only cancel events within 24 hours of Stripe receiving them"
MAX_AGE = timedelta(days=35)  # timestamp: "within the past 35 calendar days"
SAFETY = timedelta(minutes=10)  # act this long before a window closes (clocks, a send's retries)

# Rows that can have reached Stripe, or settle a quantity without being sent (carry rows).
COUNTED = ("pending", "deferred", "sent", "held", "applied")
SEND_LOCK = 4002  # the advisory lock (class, 0) held by the one process sending rows (billing review L4)

PERIOD_ERRORS = Counter("tally_billing_period_errors", "subscriptions whose billing period could not be computed")


def identifier(tenant: str, subject: str, meter: str, label: str, seq: int) -> str:
    """Stable and short (Stripe allows 100 characters): the same row always sends the same identifier."""
    digest = hashlib.sha256(f"{tenant}\x1f{subject}\x1f{meter}\x1f{label}\x1f{seq}".encode()).hexdigest()[:40]
    return f"tally_{digest}"


def whole(quantity: Decimal) -> Decimal:
    """The whole units of a quantity: Stripe's `value` takes whole numbers; the rest waits (docs/adr/0065)."""
    return quantity.to_integral_value(rounding=ROUND_FLOOR)


def invoice_cutoff(period_end: datetime, grace_s: int) -> datetime:
    """The last moment a row stamped inside a finished period is sent: Stripe finalises its invoice at
    end + grace, and an event stamped inside after that is invoiced nowhere (billing review H2)."""
    grace = timedelta(seconds=grace_s)
    return period_end + grace - min(grace / 4, SAFETY)


class StripeSender:
    """Sends one row at a time through tenacity retries inside a process-wide circuit breaker, always
    with the row's own Stripe-Account header."""

    def __init__(self, config: BillingConfig) -> None:
        self._client = stripe.StripeClient(config.stripe_api_key, base_addresses={"api": config.stripe_api_base},
                                           max_network_retries=0)
        self.breaker = pybreaker.CircuitBreaker(fail_max=config.stripe_breaker_fail_max,
                                                reset_timeout=config.stripe_breaker_reset_s, exclude=list(PERMANENT),
                                                listeners=[metrics.BreakerGauge()])
        metrics.show_breaker(self.breaker.current_state)
        self._retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(config.stripe_max_attempts),
            wait=tenacity.wait_exponential(multiplier=0.2, max=5),
            retry=tenacity.retry_if_not_exception_type(PERMANENT), reraise=True)

    def send(self, row: asyncpg.Record) -> None:
        self.breaker.call(self._retrying, self._create, row)

    def cancel(self, row: asyncpg.Record) -> None:
        self.breaker.call(self._retrying, self._cancel, row)

    def _create(self, row: asyncpg.Record) -> None:
        self._client.v1.billing.meter_events.create(
            params={"event_name": row["event_name"], "identifier": row["identifier"],
                    "timestamp": int(row["event_time"].timestamp()),
                    "payload": {"stripe_customer_id": row["stripe_customer_id"], "value": str(int(row["value"]))}},
            options={"idempotency_key": row["identifier"], "stripe_account": row["stripe_account"]})

    def _cancel(self, row: asyncpg.Record) -> None:
        self._client.v1.billing.meter_event_adjustments.create(
            params={"event_name": row["event_name"], "type": "cancel", "cancel": {"identifier": row["identifier"]}},
            options={"idempotency_key": f"cancel_{row['identifier']}", "stripe_account": row["stripe_account"]})

    def summary(self, account: str, event_name: str, customer: str, start: datetime, end: datetime) -> Decimal | None:
        """Stripe's own total of the customer's events on the meter of `event_name` stamped in [start, end)
        (eventually consistent); None when the account has no such meter."""
        options = {"stripe_account": account}
        meters = self._client.v1.billing.meters.list(params={"limit": 100}, options=options)
        meter = next((m for m in meters.auto_paging_iter() if m.event_name == event_name), None)
        if meter is None:
            return None
        summaries = self._client.v1.billing.meters.event_summaries.list(
            meter.id, params={"customer": customer, "start_time": int(start.timestamp()),
                              "end_time": int(end.timestamp()), "limit": 100}, options=options)
        total = sum((Decimal(str(s.aggregated_value)) for s in summaries.auto_paging_iter()), Decimal(0))
        return total.to_integral_value() if total == total.to_integral_value() else total  # a float: 5.0 is 5


# -- planning ------------------------------------------------------------------------------------------

_ROW = """
insert into stripe_reports (identifier, tenant, subject, meter, period_label, period_end, seq, kind, event_name,
                            stripe_customer_id, value, event_time, stripe_account, status, carried_from)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
"""
_ROWS = """
select tenant, id, seq, kind, value, status, sent_at, first_sent_at from stripe_reports
where tenant = $1 and subject = $2 and meter = $3 and period_label = $4 order by seq
"""


@dataclass
class Planned:
    rows_written: int = 0
    cancelling: int = 0
    carried: int = 0
    blocked_by_failed: int = 0
    period_errors: int = 0
    subscription_errors: int = 0
    not_reported: set[str] = field(default_factory=set)  # tenants without a Stripe account

    def figures(self) -> dict[str, Any]:
        return {**asdict(self), "not_reported": sorted(self.not_reported)}


@dataclass
class _Key:
    """One (tenant, subject, meter, period) and what its new rows carry."""

    tenant: str
    sub: Subscription
    meter: str
    event_name: str
    account: str

    async def lock(self, conn: asyncpg.Connection, period: Period) -> list[asyncpg.Record]:
        """Serialise planning of this period and meter (transaction lock); its rows."""
        await conn.execute("select pg_advisory_xact_lock(4001, hashtext($1))",
                           f"{self.tenant}\x1f{self.sub.subject}\x1f{self.meter}\x1f{period.label}")
        return await conn.fetch(_ROWS, self.tenant, self.sub.subject, self.meter, period.label)

    async def write(self, conn: asyncpg.Connection, period: Period, seq: int, kind: str, value: Decimal,
                    at: datetime, status: str = "pending", carried_from: Any = None) -> None:
        await conn.execute(_ROW, identifier(self.tenant, self.sub.subject, self.meter, str(period.label), seq),
                           self.tenant, self.sub.subject, self.meter, period.label, period.end, seq, kind,
                           self.event_name, self.sub.stripe_customer_id, value, at, self.account, status,
                           carried_from)


async def _take_back(conn: asyncpg.Connection, rows: list[asyncpg.Record], excess: Decimal, now: datetime,
                     final: bool) -> tuple[Decimal, int]:
    """Lower what a period's rows hold by up to `excess` (billing review L3): rows never handed to Stripe are
    superseded, then rows Stripe received less than 24 h ago are cancelled (newest first). Returns the
    amount taken back and how many cancels were started; what is left is credited later."""
    taken, cancels = Decimal(0), 0
    unsent = [r for r in rows if r["status"] in ("pending", "deferred") and r["first_sent_at"] is None]
    recent = [r for r in rows if r["status"] == "sent" and r["kind"] != "carry" and r["sent_at"] is not None
              and now - r["sent_at"] < CANCEL_WINDOW - SAFETY and not (final and r["kind"] == "usage")]
    for row, status in [(r, "superseded") for r in reversed(unsent)] + [(r, "cancelling") for r in reversed(recent)]:
        if taken >= excess:
            break
        # Guarded against the sender, which sets first_sent_at (guarded too) before it hands a row over.
        if await conn.fetchval("update stripe_reports set status = $3, error = 'usage fell after it was written:"
                               " taken back' where tenant = $4 and id = $1 and status = $2 and (status = 'sent' or"
                               " first_sent_at is null) returning true", row["id"], row["status"], status,
                               row["tenant"]):
            taken += row["value"]
            cancels += status == "cancelling"
    return taken, cancels


async def _plan_period(conn: asyncpg.Connection, key: _Key, period: Period, quantity: Decimal, now: datetime,
                       grace_s: int, current: Period, planned: Planned) -> None:
    final = now >= invoice_cutoff(period.end, grace_s)
    async with conn.transaction():
        rows = await key.lock(conn, period)
        if any(r["status"] == "failed" for r in rows):
            planned.blocked_by_failed += 1  # Stripe refused a row of this key: it waits for `tally billing retry`
            return
        reported = sum((r["value"] for r in rows if r["status"] in COUNTED), Decimal(0))
        seq = max((r["seq"] for r in rows), default=0)
        if quantity < reported:
            taken, cancels = await _take_back(conn, rows, reported - quantity, now, final)
            reported -= taken
            planned.cancelling += cancels
        due = whole(quantity - reported)
        if due >= 1:
            seq += 1
            if final:  # its invoice is final: the next invoice gets it, naming this period
                await key.write(conn, period, seq, "adjustment", due, now)
            else:
                await key.write(conn, period, seq, "usage", due, min(now, period.end - timedelta(seconds=1)))
            reported += due
            planned.rows_written += 1
        if final and reported != quantity and current.label != period.label:
            # A finished period's remainder (a fraction below one unit, or an over-report nothing could take
            # back) moves to the current period as a pair of carry rows, never sent (docs/adr/0066).
            balance = quantity - reported
            await key.write(conn, period, seq + 1, "carry", balance, now, "applied", current.label)
            current_rows = await key.lock(conn, current)
            await key.write(conn, current, max((r["seq"] for r in current_rows), default=0) + 1, "carry", -balance,
                            now, "applied", period.label)
            planned.carried += 1


async def _plan_subscription(conn: asyncpg.Connection, catalog: Catalog, tenant: str, sub: Subscription,
                             account: str, now: datetime, grace_s: int, planned: Planned) -> None:
    """A meter still backfilling is not reported until its figure is whole (ADR 0140)."""
    current = period_at(sub.anchor(), now)
    wanted = [current]
    if current.label > sub.start_date:
        wanted.append(previous(sub.anchor(), current))
    for period in reversed(wanted):  # the previous period first: it may carry into the current one
        terms = await terms_for(conn, tenant, sub.subject, period)
        if terms is None:
            continue
        windows = await from_postgres(conn, tenant, sub.subject, terms.meters(), period.start, period.end,
                                      catalog.counters(tenant, terms.meters()))
        for meter in terms.meters():
            if meter in catalog.backfilling(tenant):
                continue
            pm = terms.meter(meter)[1]
            key = _Key(tenant, sub, meter, pm.stripe_event or meter, account)
            await _plan_period(conn, key, period, terms.billable(meter, windows[meter]), now, grace_s, current,
                               planned)


async def plan_reports(ctx: JobContext, now: datetime) -> Planned:
    """Write the rows every billable quantity needs; one subscription's error never stops the others."""
    planned = Planned()
    catalog = await ctx.catalog()
    async with ctx.pool.acquire() as conn:
        tenant_accounts = await accounts(conn)
        for tenant, sub in await load_subscriptions(conn, None):
            if not sub.stripe_customer_id:
                continue
            account = tenant_accounts.get(tenant)
            if account is None:
                planned.not_reported.add(tenant)
                continue
            try:
                await _plan_subscription(conn, catalog, tenant, sub, account, now, ctx.config.stripe_invoice_grace_s,
                                         planned)
            except PeriodError as exc:
                log.warning("%s/%s: no billing period, not reported: %s", tenant, sub.subject, exc)
                PERIOD_ERRORS.inc()
                planned.period_errors += 1
            except OUTAGES:
                raise
            except Exception:
                log.exception("%s/%s: reporting failed; the other subscriptions go on", tenant, sub.subject)
                planned.subscription_errors += 1
    for tenant in sorted(planned.not_reported):
        log.warning("%s has subscriptions with Stripe customers but no Stripe account: not reported "
                    "(tally billing account set --tenant %s --account acct_...)", tenant, tenant)
    return planned


# -- sending -------------------------------------------------------------------------------------------

def _unsendable(row: asyncpg.Record, now: datetime, grace_s: int) -> str | None:
    """Why this row must not be sent now, or None."""
    if row["stripe_account"] is None:
        return "written before each tenant had its own Stripe account"
    if row["first_sent_at"] is not None and now - row["first_sent_at"] >= IDENTIFIER_WINDOW - SAFETY:
        return (f"first sent {row['first_sent_at']:%Y-%m-%d %H:%M} UTC and Stripe remembers an identifier for 24 h"
                " only, so a re-send could bill it twice")
    if row["event_time"] < row["period_end"] and now >= invoice_cutoff(row["period_end"], grace_s):
        return (f"stamped in the period ending {row['period_end']:%Y-%m-%d %H:%M} UTC, whose invoice Stripe has"
                " finalised")
    if now - row["event_time"] >= MAX_AGE - SAFETY:
        return "stamped more than 35 days ago, which Stripe refuses"
    return None


async def _mark(conn: asyncpg.Connection, row: asyncpg.Record, status: str, error: str | None, tried: bool,
                now: datetime) -> bool:
    """A guarded status change: only from the status the row was read with, so a row is never moved back."""
    done = await conn.fetchval(
        "update stripe_reports set status = $3, error = $4, attempts = attempts + $5,"
        " sent_at = case when $3 = 'sent' then coalesce(sent_at, $6) else sent_at end"
        " where tenant = $7 and id = $1 and status = $2 returning true", row["id"], row["status"], status, error,
        int(tried), now, row["tenant"])
    return bool(done)


async def send_unsent(ctx: JobContext, sender: StripeSender, now: datetime,
                      hook: Callable[[str], None]) -> dict[str, int]:
    """Send every row not sent yet and every cancel, oldest first, while holding the one sending lock;
    returns how many ended in each status (`busy` when another process is sending).

    `hook` is the tests' crash hook, called before each send and after a send succeeded."""
    outcome = {"sent": 0, "deferred": 0, "failed": 0, "held": 0, "superseded": 0, "cancelled": 0, "busy": 0}
    async with ctx.pool.acquire() as conn:
        if not await conn.fetchval("select pg_try_advisory_lock($1, 0)", SEND_LOCK):
            outcome["busy"] = 1
            return outcome
        try:
            rows = await conn.fetch("select * from stripe_reports where status in ('pending', 'deferred', 'cancelling')"
                                    " order by id")
            breaker_open = False
            for row in rows:
                done = await _send_one(conn, sender, row, now, hook, breaker_open, ctx.config.stripe_invoice_grace_s)
                if done is None:
                    continue  # taken back by a planner meanwhile: never handed to Stripe
                status, error, tried = done
                breaker_open = breaker_open or (error or "").startswith("circuit open")
                if await _mark(conn, row, status, error, tried, now) and status in outcome:
                    outcome[status] += 1
        finally:
            await conn.execute("select pg_advisory_unlock($1, 0)", SEND_LOCK)
    for status, count in outcome.items():
        if status != "busy":
            metrics.SENDS.labels(status).inc(count)
    return outcome


async def _send_one(conn: asyncpg.Connection, sender: StripeSender, row: asyncpg.Record, now: datetime,
                    hook: Callable[[str], None], breaker_open: bool,
                    grace_s: int) -> tuple[str, str | None, bool] | None:
    """(status, error, tried) for one row; None if the row is no longer to be sent."""
    cancel = row["status"] == "cancelling"
    if not cancel and (reason := _unsendable(row, now, grace_s)):
        # Never handed to Stripe: nothing can have arrived, the next run plans it afresh. Else a person decides.
        return ("held" if row["first_sent_at"] else "superseded"), reason, False
    if breaker_open:
        return row["status"] if cancel else "deferred", "circuit open: not tried", False
    if not cancel:
        hook("report_before_send")
        if not await conn.fetchval("update stripe_reports set first_sent_at = coalesce(first_sent_at, $3)"
                                   " where tenant = $4 and id = $1 and status = $2 returning true", row["id"],
                                   row["status"], now, row["tenant"]):
            return None
    try:
        await asyncio.to_thread(sender.cancel if cancel else sender.send, row)
        if not cancel:
            hook("report_after_send")
        return ("cancelled" if cancel else "sent"), None, True
    except pybreaker.CircuitBreakerError as exc:
        return row["status"] if cancel else "deferred", f"circuit open: {exc}", True
    except PERMANENT as exc:
        # A refused cancel leaves the event billed: the row is sent again, its over-report credited later.
        return ("sent" if cancel else "failed"), f"{type(exc).__name__}: {exc}", True
    except (stripe.StripeError, OSError) as exc:
        return row["status"] if cancel else "deferred", f"{type(exc).__name__}: {exc}", True


async def report(ctx: JobContext, sender: StripeSender, now: datetime, hook: Callable[[str], None]) -> dict[str, Any]:
    """One reporting run: rows for what changed, then every row and cancel not yet sent."""
    planned = await plan_reports(ctx, now)
    return {**planned.figures(), **await send_unsent(ctx, sender, now, hook), "breaker": sender.breaker.current_state}


# -- rows that need a person ---------------------------------------------------------------------------

async def attention(conn: asyncpg.Connection, tenant: str | None) -> list[asyncpg.Record]:
    """Rows Stripe refused (`failed`) and rows that wait for a decision (`held`), with their errors."""
    return await conn.fetch("select * from stripe_reports where status in ('failed', 'held')"
                            " and ($1::text is null or tenant = $1) order by id", tenant)


async def retry(conn: asyncpg.Connection, tenant: str, row_id: int | None) -> int:
    """Release refused rows after their cause is fixed: the next run plans their quantity afresh, with the
    subscription's customer, meter and account as they are now. Returns how many."""
    done = await conn.fetch("update stripe_reports set status = 'superseded', error = error || ' (retried)'"
                            " where status = 'failed' and tenant = $1 and ($2::bigint is null or id = $2) returning id",
                            tenant, row_id)
    return len(done)


async def resolve(conn: asyncpg.Connection, tenant: str, row_id: int, stripe_has_it: bool) -> bool:
    """Decide a held row: Stripe has it (it counts as sent), or not (the next run plans its quantity afresh,
    stamped where Stripe still takes it)."""
    if stripe_has_it:
        sql = ("update stripe_reports set status = 'sent', sent_at = first_sent_at, error = 'resolved: Stripe has it'"
               " where id = $1 and tenant = $2 and status = 'held' returning true")
    else:
        sql = ("update stripe_reports set status = 'superseded', error = 'resolved: Stripe does not have it'"
               " where id = $1 and tenant = $2 and status = 'held' returning true")
    return bool(await conn.fetchval(sql, row_id, tenant))
