"""Period close: a period past its end plus the grace is reported and frozen; a late event after close
changes the live figure, not the frozen one; what a finished period gains after Stripe finalised its
invoice goes to Stripe as an adjustment on the next invoice, never stamped into the finalised one; one
job for one key never runs twice at once."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import asyncpg

from tally.billing.accounts import set_account
from tally.billing.context import BillingConfig, JobContext
from tally.billing.jobs import Job, run_job
from tally.meters.definitions import load_meters
from tally.schemas.envelope import Envelope
from tally.settings import Settings
from tests.metering.helpers import METERS, account_of, metered, run_tally
from tests.metering.stripe_double import stripe_double
from tests.metering.test_usage_api import _zone_past_midnight
from tests.processor.helpers import drained, produce, wait_for
from tests.support import running
from tally.usage.periods import period_at, previous
from tally.usage.plans import Plan, PlanMeter, Subscription, save_plan, subscribe


def _calls(tenant: str, subject: str, times: list[datetime], first: int) -> list[Envelope]:
    now = datetime.now(timezone.utc)
    return [Envelope(id=f"c-{first + i}", source="app", type="api.call", subject=subject, time=t, received_at=now,
                     data={}, tenant=tenant) for i, t in enumerate(times)]


@dataclass(frozen=True)
class Closing:
    """A new customer billed monthly for one meter (2 included), in a zone whose midnight was some 10 hours ago and
    on that day of the month, so its last period ended at `boundary`: Stripe's invoice of that period runs from
    `previous_start` to it."""

    subject: str
    customer: str
    today: date
    boundary: datetime
    previous_start: datetime


async def closing(db: asyncpg.Connection, tenant: str, meter: str) -> Closing:
    subject, customer = "acme", f"cus_{uuid.uuid4().hex[:10]}"
    now = datetime.now(timezone.utc)
    zone = _zone_past_midnight(now)
    today = now.astimezone(ZoneInfo(zone)).date()
    await set_account(db, tenant, account_of(tenant))
    await save_plan(db, tenant, Plan(id="p", meters=[PlanMeter(meter=meter, included=2)]))
    sub = Subscription(subject=subject, plan_id="p", stripe_customer_id=customer, anchor_day=today.day,
                       time_zone=zone, start_date=today - timedelta(days=60))
    await subscribe(db, tenant, sub)
    boundary = datetime.combine(today, datetime.min.time(), tzinfo=ZoneInfo(zone)).astimezone(timezone.utc)
    return Closing(subject, customer, today, boundary, previous(sub.anchor(), period_at(sub.anchor(), now)).start)


async def test_close_freezes_the_period_and_a_late_event_becomes_an_adjustment(isolated: Settings,
                                                                              db: asyncpg.Connection) -> None:
    settings = metered(isolated)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    c = await closing(db, tenant, "api_calls")
    subject, customer, today, boundary = c.subject, c.customer, c.today, c.boundary
    # the jobs close after a minute; the processor keeps its one-day horizon (the jobs check they agree)
    env = {"TALLY_CLOSE_GRACE_S": "60", "TALLY_LATE_HORIZON_S": "60"}
    with stripe_double() as double, running("processor", ["process"], settings):
        double.periods[(account_of(tenant), customer)] = [(c.previous_start, boundary)]
        env["TALLY_STRIPE_API_BASE"] = double.url
        before = [boundary - timedelta(hours=2, minutes=i) for i in range(5)]
        after = [boundary + timedelta(minutes=30 + i) for i in range(3)]
        produce(settings, _calls(tenant, subject, before + after, 0))
        await wait_for(lambda: drained(settings, db), 60, "the processor")

        code, out = run_tally(["jobs", "run", "period_close"], settings, **env)
        assert code == 0, out
        closed = await db.fetch("select * from period_usage where tenant = $1 order by period_end", tenant)
        assert closed[:-1] and all(r["used"] == 0 for r in closed[:-1])  # earlier periods since the start date
        assert (closed[-1]["used"], closed[-1]["overage"], closed[-1]["period_end"]) == (5, 3, boundary)

        produce(settings, _calls(tenant, subject, [boundary - timedelta(hours=1)], 100))  # late, within the horizon
        await wait_for(lambda: drained(settings, db), 60, "the processor")
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, **env)
        assert code == 0, out
        code, out = run_tally(["jobs", "run", "period_close"], settings, **env)
        assert code == 0 and "'periods_closed': 0" in out, out

    assert (await db.fetchval("select used from period_usage where tenant = $1 and period_end = $2", tenant,
                              boundary)) == 5
    rows = await db.fetch("select period_label, kind, value, event_time, status from stripe_reports"
                          " where tenant = $1 order by id", tenant)
    # Some 10 h after the end Stripe's invoice of the finished period (1 h grace) is final: its quantity goes
    # to the next invoice as adjustments naming the period, stamped when sent (billing review H2).
    previous_label = [r for r in rows if r["period_label"] != today]
    assert [(r["kind"], r["value"]) for r in previous_label] == [("adjustment", 3), ("adjustment", 1)]
    assert all(r["event_time"] > boundary + timedelta(hours=1) for r in previous_label)
    current = [r for r in rows if r["period_label"] == today]
    assert [(r["kind"], r["value"]) for r in current] == [("usage", 1)]
    assert all(r["status"] == "sent" for r in rows)
    assert sum(int(s.value) for s in double.for_customer(customer)) == 3 + 1 + 1
    assert double.late() == []  # nothing stamped into the finalised invoice


async def test_two_runs_of_one_job_for_one_key_never_overlap(settings: Settings) -> None:
    config = BillingConfig(settings.database_url, settings.redis_url, settings.redis_prefix,
                           settings.redis_counter_ttl_s, load_meters(inline=METERS))
    ctx = await JobContext.open(config)
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(_ctx: JobContext, _key: str, _now: datetime) -> dict:
        started.set()
        await release.wait()
        return {"done": True}

    job = Job(f"slow-{uuid.uuid4().hex[:6]}", slow, lambda now: "k", "a test job")
    try:
        first = asyncio.create_task(run_job(ctx, job, "2026-01-01"))
        await started.wait()
        second = await run_job(ctx, job, "2026-01-01")
        other_key = asyncio.create_task(run_job(ctx, job, "2026-01-02"))
        release.set()
        assert second.status == "busy"
        assert (await first).status == "ok" and (await other_key).status == "ok"
        assert (await run_job(ctx, job, "2026-01-01")).status == "done"
        runs = await ctx.pool.fetch("select run_key, status, figures from job_runs where job = $1 order by id",
                                    job.name)
        assert [(r["run_key"], r["status"]) for r in runs] == [("2026-01-01", "ok"), ("2026-01-02", "ok")]
    finally:
        await ctx.close()


