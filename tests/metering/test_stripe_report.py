"""Stripe usage reporting: rows written before sending, the same identifier and Idempotency-Key on every
re-send across kill -9 at both crash points, the breaker deferring reports while Stripe fails and sending
them when it recovers, and the request shape against stripe-mock."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg

from tally.billing.accounts import set_account
from tally.billing.context import BillingConfig, JobContext
from tally.billing.stripe_report import StripeSender, report, resolve
from tally.meters.definitions import load_meters
from tally.schemas.envelope import Envelope
from tally.settings import ROOT, Settings
from tests.metering.helpers import (METERS, account_of, billed_subject, calls, counted, metered, one_billed_subject,
                                    run_tally)
from tests.metering.stripe_double import WHOLE, StripeDouble, stripe_double
from tests.metering.test_usage_api import _zone_past_midnight
from tests.processor.helpers import drained, produce, wait_for
from tests.support import env_for, running
from tally.usage.periods import Period, period_at, previous
from tally.usage.plans import Plan, PlanMeter, Subscription, save_plan, subscribe


async def _rows(db: asyncpg.Connection, customer: str) -> list[asyncpg.Record]:
    return await db.fetch("select * from stripe_reports where stripe_customer_id = $1 order by seq", customer)


def _one_value_per_identifier(double: StripeDouble, customer: str) -> dict[str, Decimal]:
    values: dict[str, set[str]] = defaultdict(set)
    for sent in double.for_customer(customer):
        assert sent.idempotency_key == sent.identifier
        values[sent.identifier].add(sent.value)
    assert all(len(v) == 1 for v in values.values()), values
    return {identifier: Decimal(next(iter(v))) for identifier, v in values.items()}


async def test_kill_9_before_and_after_sending_bills_the_overage_exactly_once(isolated: Settings,
                                                                                db: asyncpg.Connection) -> None:
    settings = metered(isolated)
    tenant, subject, customer = await one_billed_subject(db, 10)
    with stripe_double() as double, running("processor", ["process"], settings):
        base = {"TALLY_STRIPE_API_BASE": double.url}
        await counted(settings, db, calls(tenant, subject, 25))

        code, out = run_tally(["jobs", "run", "stripe_report"], settings, TALLY_CRASH_AT="report_before_send", **base)
        assert code == -9, out
        assert [(r["value"], r["status"]) for r in await _rows(db, customer)] == [(15, "pending")]
        assert double.for_customer(customer) == []

        await counted(settings, db, calls(tenant, subject, 7, first=100))
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, TALLY_CRASH_AT="report_after_send", **base)
        assert code == -9, out
        assert len(double.for_customer(customer)) == 1  # sent, but killed before it was marked sent

        code, out = run_tally(["jobs", "run", "stripe_report"], settings, **base)
        assert code == 0, out

    rows = await _rows(db, customer)
    assert [(r["value"], r["status"]) for r in rows] == [(15, "sent"), (7, "sent")]
    sent = _one_value_per_identifier(double, customer)
    assert sorted(sent) == sorted(r["identifier"] for r in rows)
    assert len(double.for_customer(customer)) == 3  # the first row twice, with one identifier and one value
    assert sum(sent.values()) == 25 + 7 - 10  # the overage, once
    runs = await db.fetch("select status, error from job_runs where job = 'stripe_report' order by id")
    assert [r["status"] for r in runs][-1] == "ok" and any(r["error"] == "interrupted" for r in runs)


async def test_breaker_opens_while_stripe_fails_and_deferred_reports_are_sent_later(
        isolated: Settings, db: asyncpg.Connection) -> None:
    settings = metered(isolated)
    tenant, customer = f"t-{uuid.uuid4().hex[:8]}", f"cus_{uuid.uuid4().hex[:10]}"
    subjects = [f"s{i}" for i in range(4)]
    for subject in subjects:
        await billed_subject(db, tenant, subject, customer, included=1)
    with stripe_double() as double, running("processor", ["process"], settings):
        env = {"TALLY_STRIPE_API_BASE": double.url, "TALLY_STRIPE_MAX_ATTEMPTS": "2",
               "TALLY_STRIPE_BREAKER_FAIL_MAX": "2"}
        await counted(settings, db, [e for s in subjects for e in calls(tenant, s, 3, first=hash(s) % 1000 * 10)])

        double.failing = True
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, **env)
        rows = await _rows(db, customer)
        assert [r["status"] for r in rows] == ["deferred"] * 4, out
        # two rows (ours or another test's in this database) tried twice each, then the breaker is open
        # and the rest are not tried at all
        assert len(double.received) == 4
        assert sum(r["attempts"] for r in rows) <= 2 and rows[-1]["attempts"] == 0
        assert all(r["error"] for r in rows)

        double.failing = False
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, **env)
        assert code == 0, out
    rows = await _rows(db, customer)
    assert [r["status"] for r in rows] == ["sent"] * 4
    assert sum(_one_value_per_identifier(double, customer).values()) == 4 * (3 - 1)


async def test_reports_are_accepted_by_stripe_mock(isolated: Settings, db: asyncpg.Connection) -> None:
    settings = metered(isolated)
    tenant, subject, customer = await one_billed_subject(db, 0, report="usage")
    with running("processor", ["process"], settings):
        await counted(settings, db, calls(tenant, subject, 3))
    code, out = run_tally(["jobs", "run", "stripe_report"], settings)  # stripe_api_base: stripe-mock
    assert code == 0, out
    assert [(r["value"], r["status"], r["kind"]) for r in await _rows(db, customer)] == [(3, "sent", "usage")]


# -- Stripe's documented rules, with the double that enforces them ------------------------------------

@asynccontextmanager
async def reporting(settings: Settings, double: StripeDouble, **config: object) -> AsyncIterator[Reporter]:
    """The report job in this process, so a test can pass the moment it runs at (`now`)."""
    billing = BillingConfig(settings.database_url, settings.redis_url, settings.redis_prefix,
                            settings.redis_counter_ttl_s, load_meters(inline=METERS), stripe_api_base=double.url,
                            stripe_max_attempts=1, **config)  # type: ignore[arg-type]
    ctx = await JobContext.open(billing)
    sender = StripeSender(billing)

    async def run(now: datetime) -> dict:
        double.offset_s = now.timestamp() - time.time()  # Stripe's clock at the same moment
        return await report(ctx, sender, now, lambda _point: None)

    try:
        yield run
    finally:
        await ctx.close()


Reporter = Callable[[datetime], Awaitable[dict]]


@dataclass
class Boundary:
    """A subscription whose previous period ended some 10 hours ago (local midnight of a real zone)."""

    tenant: str
    subject: str
    customer: str
    account: str
    previous: Period
    current: Period

    def at(self, delta: timedelta) -> datetime:
        return self.current.start + delta


async def _boundary(db: asyncpg.Connection, plan: Plan) -> Boundary:
    tenant, customer = f"t-{uuid.uuid4().hex[:8]}", f"cus_{uuid.uuid4().hex[:10]}"
    now = datetime.now(timezone.utc)
    zone = _zone_past_midnight(now)
    today = now.astimezone(ZoneInfo(zone)).date()
    await set_account(db, tenant, account_of(tenant))
    await save_plan(db, tenant, plan)
    sub = Subscription(subject="acme", plan_id=plan.id, stripe_customer_id=customer, anchor_day=today.day,
                       time_zone=zone, start_date=today - timedelta(days=60))
    await subscribe(db, tenant, sub)
    current = period_at(sub.anchor(), now)
    return Boundary(tenant, "acme", customer, account_of(tenant), previous(sub.anchor(), current), current)


def _events(b: Boundary, times: list[datetime], first: int, tokens: list[str] | None = None) -> list[Envelope]:
    received = datetime.now(timezone.utc)
    return [Envelope(id=f"e-{first + i}", source="app", type="llm.completion" if tokens else "api.call",
                     subject=b.subject, time=t, received_at=received, tenant=b.tenant,
                     data={"tokens": float(tokens[i])} if tokens else {}) for i, t in enumerate(times)]


async def _window_down(db: asyncpg.Connection, b: Boundary, meter: str, hour: datetime, by: int) -> None:
    """What a reconciliation fix does to a window that was counted too high: its value goes down."""
    done = await db.execute("update counters set value = value - $4 where tenant = $1 and subject = $2 and meter = $3"
                            " and window_name = 'hour' and window_start = $5", b.tenant, b.subject, meter, by,
                            hour.replace(minute=0, second=0, microsecond=0))
    assert done == "UPDATE 1"


async def _report_rows(db: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    return await db.fetch("select * from stripe_reports where tenant = $1 order by id", tenant)


async def test_a_fractional_sum_meter_is_billed_in_whole_units_with_the_remainder_carried(
        isolated: Settings, db: asyncpg.Connection) -> None:
    """Billing review C2 and H2: Stripe takes whole numbers, so a SUM meter of fractions is billed in whole
    units per period and what is left below one unit moves to the next period; nothing lost or billed twice,
    and the last delta of a finished period reaches its invoice within the finalisation grace."""
    settings = metered(isolated)
    b = await _boundary(db, Plan(id="tok", report="usage", meters=[PlanMeter(meter="tokens", included=0)]))
    before = ["10.25", "100.5", "0.5", "3.3"]  # 114.55 in the finished period
    after = ["0.25", "0.5"]  # 0.75 in the current one
    with stripe_double() as double, running("processor", ["process"], settings):
        double.periods[(b.account, b.customer)] = [(b.previous.start, b.previous.end), (b.current.start, b.current.end)]
        produce(settings, _events(b, [b.at(-timedelta(hours=2, minutes=i)) for i in range(4)], 0, before)
                + _events(b, [b.at(timedelta(minutes=30 + i)) for i in range(2)], 10, after))
        await wait_for(lambda: drained(settings, db), 60, "the processor")
        async with reporting(settings, double) as run:
            first = await run(b.at(timedelta(minutes=20)))  # within Stripe's 1 h grace after the period end
            second = await run(b.at(timedelta(hours=3)))  # its invoice is final now
            third = await run(b.at(timedelta(hours=4)))
    assert first["failed"] == second["failed"] == 0 and third["rows_written"] == 0, (first, second, third)
    assert all(WHOLE.match(s.value) for s in double.received)
    assert double.invoiced(b.account, b.customer, b.previous.start, b.previous.end) == 114
    assert double.invoiced(b.account, b.customer, b.current.start, b.current.end) == 1  # 0.55 carried + 0.75
    assert double.late() == []
    rows = await _report_rows(db, b.tenant)
    held = {label: sum(r["value"] for r in rows if r["period_label"] == label and r["status"] in ("sent", "applied"))
            for label in (b.previous.label, b.current.label)}
    assert held[b.previous.label] == Decimal("114.55")  # billed 114, 0.55 moved on: the period settled exactly
    assert held[b.current.label] == Decimal("0.45")  # 1 billed less the 0.55 carried in; 0.30 still to bill
    usage = [r for r in rows if r["kind"] == "usage" and r["period_label"] == b.previous.label]
    assert [(r["value"], r["event_time"]) for r in usage] == [(114, b.previous.end - timedelta(seconds=1))]


async def test_a_refused_row_is_not_billed_is_listed_and_goes_out_after_a_fix(isolated: Settings,
                                                                              db: asyncpg.Connection) -> None:
    """Billing review C2: a 4xx (here: an account the platform is not connected to) marks the row failed; it
    counts as nothing billed, blocks its key instead of piling up, is listed, and after the fix and
    `tally billing retry` the quantity goes out once."""
    settings = metered(isolated)
    tenant, subject, customer = await one_billed_subject(db, 2)
    await set_account(db, tenant, "acct_typo")
    with stripe_double() as double, running("processor", ["process"], settings):
        double.connected = {account_of(tenant)}
        env = {"TALLY_STRIPE_API_BASE": double.url}
        await counted(settings, db, calls(tenant, subject, 5))
        for _ in range(2):
            code, out = run_tally(["jobs", "run", "stripe_report"], settings, **env)
        assert [(r["value"], r["status"]) for r in await _report_rows(db, tenant)] == [(3, "failed")], out
        code, out = run_tally(["billing", "rows", "--tenant", tenant], settings)
        assert code == 1 and "failed" in out and "PermissionError" in out, out

        code, out = run_tally(["billing", "account", "set", "--tenant", tenant, "--account", account_of(tenant)],
                              settings)
        assert code == 0, out
        code, out = run_tally(["billing", "retry", "--tenant", tenant], settings)
        assert code == 0 and "1 refused row(s) released" in out, out
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, **env)
        assert code == 0, out
    rows = await _report_rows(db, tenant)
    assert [(r["value"], r["status"]) for r in rows] == [(3, "superseded"), (3, "sent")]
    assert sum(e.value for e in double.accepted(account_of(tenant), customer)) == 3


async def test_a_row_that_may_have_reached_stripe_is_held_after_the_identifier_window(
        isolated: Settings, db: asyncpg.Connection) -> None:
    """Billing review H3: killed after Stripe accepted a row but before it was marked, then down for more than
    24 h, after which Stripe has forgotten the identifier: the row is held, not re-sent, listed, and
    resolved by a person; billed once."""
    settings = metered(isolated)
    tenant, subject, customer = await one_billed_subject(db, 1)
    with stripe_double() as double, running("processor", ["process"], settings):
        env = {"TALLY_STRIPE_API_BASE": double.url}
        await counted(settings, db, calls(tenant, subject, 4))
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, TALLY_CRASH_AT="report_after_send", **env)
        assert code == -9 and len(double.accepted(customer=customer)) == 1, out

        double.advance(25 * 3600)  # the worker stays down for a day; Stripe forgets the identifier
        await db.execute("update stripe_reports set first_sent_at = first_sent_at - interval '25 hours',"
                         " created_at = created_at - interval '25 hours' where tenant = $1", tenant)
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, **env)
        assert code == 0 and "'held': 1" in out, out
        assert len(double.accepted(customer=customer)) == 1  # not sent again
        code, out = run_tally(["billing", "rows", "--tenant", tenant], settings)
        assert code == 1 and "held" in out and "24 h" in out, out
        row_id = (await _report_rows(db, tenant))[0]["id"]
        code, out = run_tally(["billing", "resolve", "--tenant", tenant, "--id", str(row_id), "--stripe-has-it"],
                              settings)
        assert code == 0, out
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, **env)
        assert code == 0 and "'rows_written': 0" in out, out
    assert [(r["value"], r["status"]) for r in await _report_rows(db, tenant)] == [(3, "sent")]
    assert sum(e.value for e in double.accepted(customer=customer)) == 3


async def test_usage_that_goes_down_is_cancelled_within_24_h(isolated: Settings, db: asyncpg.Connection) -> None:
    """Billing review L3, first way: a sent row Stripe received less than 24 h ago is cancelled through a meter
    event adjustment and the corrected quantity sent instead."""
    settings = metered(isolated)
    b = await _boundary(db, Plan(id="u", report="usage", meters=[PlanMeter(meter="api_calls", included=0)]))
    hour = b.at(timedelta(minutes=30))
    with stripe_double() as double, running("processor", ["process"], settings):
        await counted(settings, db, _events(b, [hour + timedelta(seconds=i) for i in range(10)], 0))
        async with reporting(settings, double) as run:
            await run(b.at(timedelta(hours=2)))
            await _window_down(db, b, "api_calls", hour, 4)  # ten were counted, six are true
            second = await run(b.at(timedelta(hours=3)))
    assert sum(e.value for e in double.accepted(customer=b.customer)) == 6
    assert second["cancelled"] == 1 and second["sent"] == 1, second
    assert [(r["value"], r["status"]) for r in await _report_rows(db, b.tenant)] == [(10, "cancelled"), (6, "sent")]


async def test_usage_that_goes_down_after_24_h_is_credited_on_the_next_period(isolated: Settings,
                                                                             db: asyncpg.Connection) -> None:
    """Billing review L3, second way: past Stripe's cancel window the over-report is carried as a credit
    against the next period's report; over both periods Stripe bills exactly the true usage."""
    settings = metered(isolated)
    b = await _boundary(db, Plan(id="u", report="usage", meters=[PlanMeter(meter="api_calls", included=0)]))
    hour = b.at(-timedelta(hours=2))
    with stripe_double() as double, running("processor", ["process"], settings):
        produce(settings, _events(b, [hour + timedelta(seconds=i) for i in range(10)], 0)
                + _events(b, [b.at(timedelta(minutes=30, seconds=i)) for i in range(5)], 100))
        await wait_for(lambda: drained(settings, db), 60, "the processor")
        async with reporting(settings, double) as run:
            await run(b.at(-timedelta(hours=1)))  # 10 for the period that is still running
            await _window_down(db, b, "api_calls", hour, 3)
            later = await run(b.at(timedelta(hours=24)))  # 25 h after Stripe received the 10: no cancel
    assert sum(e.value for e in double.accepted(customer=b.customer)) == 7 + 5
    assert double.invoiced(None, b.customer, b.previous.start, b.previous.end) == 10
    assert double.invoiced(None, b.customer, b.current.start, b.current.end) == 2  # 5 less the 3 credited
    assert later["carried"] == 1 and later["cancelled"] == 0, later


async def test_two_jobs_never_send_the_same_row_at_once(isolated: Settings, db: asyncpg.Connection) -> None:
    """Billing review L4: stripe_report and period_close run at the same moment against a slow Stripe: every
    row is sent once, and no sent row goes back to deferred."""
    settings = metered(isolated)
    tenant, customer = f"t-{uuid.uuid4().hex[:8]}", f"cus_{uuid.uuid4().hex[:10]}"
    subjects = [f"s{i}" for i in range(6)]
    for subject in subjects:
        await billed_subject(db, tenant, subject, customer, included=0)
    with stripe_double(delay_s=0.7) as double, running("processor", ["process"], settings):
        env = env_for(settings, TALLY_STRIPE_API_BASE=double.url)
        await counted(settings, db, [e for i, s in enumerate(subjects) for e in calls(tenant, s, 2, first=1000 * i)])
        jobs = [subprocess.Popen([sys.executable, "-m", "tally.cli", "jobs", "run", name], env=env, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for name in ("stripe_report", "period_close")]
        outs = [job.communicate(timeout=120)[0] for job in jobs]
    sends: dict[str, int] = defaultdict(int)
    for sent in double.for_customer(customer):
        sends[sent.identifier] += 1
    assert len(sends) == 6 and set(sends.values()) == {1}, (sends, outs)
    assert [r["status"] for r in await _report_rows(db, tenant)] == ["sent"] * 6


async def test_a_tenants_reports_reach_only_its_own_stripe_account(isolated: Settings,
                                                                   db: asyncpg.Connection) -> None:
    """Security review H6: tenant A names tenant B's customer and meter event; A's reports still go only to
    A's account, B's only to B's; a tenant without an account is not reported, and shown as such."""
    settings = metered(isolated)
    a, b, c = (f"{n}-{uuid.uuid4().hex[:8]}" for n in "abc")
    b_customer = f"cus_{uuid.uuid4().hex[:10]}"
    await billed_subject(db, b, "victim", b_customer, included=0)
    await billed_subject(db, a, "probe", b_customer, included=0)  # A names B's customer and event name
    await billed_subject(db, c, "nobody", f"cus_{uuid.uuid4().hex[:10]}", included=0)
    await db.execute("delete from billing_accounts where tenant = $1", c)
    with stripe_double() as double, running("processor", ["process"], settings):
        await counted(settings, db, calls(a, "probe", 3) + calls(b, "victim", 2) + calls(c, "nobody", 4))
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, TALLY_STRIPE_API_BASE=double.url)
        assert code == 0 and c in out, out
    assert sum(e.value for e in double.accepted(account_of(b))) == 2
    assert sum(e.value for e in double.accepted(account_of(a))) == 3
    assert {e.account for e in double.events if e.customer == b_customer} == {account_of(a), account_of(b)}
    assert await _report_rows(db, c) == []
    code, out = run_tally(["billing", "account", "list"], settings)
    assert code == 0 and re.search(rf"{c}\s+-  \(not reported", out) and account_of(a) in out, out


async def test_explain_traces_each_meter_to_windows_events_rows_and_stripe(isolated: Settings,
                                                                          db: asyncpg.Connection) -> None:
    """The invoice-line proof: windows, the raw-event recomputation, the rows and Stripe's summary agree; a
    window that drifts from its events is shown and the proof fails."""
    settings = metered(isolated)
    tenant, subject, customer = await one_billed_subject(db, 3)
    with stripe_double() as double, running("processor", ["process"], settings):
        env = {"TALLY_STRIPE_API_BASE": double.url}
        await counted(settings, db, calls(tenant, subject, 8))
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, **env)
        assert code == 0, out
        args = ["billing", "explain", "--tenant", tenant, "--subject", subject]
        code, out = run_tally(args, settings, **env)
        assert code == 0, out
        assert re.search(r"hour \S+ \S+  window 8  raw events 8\n", out), out
        assert "used 8 (raw events 8), billable 5" in out and re.search(r"row \d+ seq 1 usage 5 sent", out), out
        assert "Stripe's summary for the period: 5; sent rows stamped in it: 5" in out
        assert "\nall agree: yes\n" in out, out

        await db.execute("update counters set value = value + 1 where tenant = $1 and window_name = 'hour'", tenant)
        code, out = run_tally(args, settings, **env)
    assert code == 1 and "window 9  raw events 8  DIFFERS" in out and "all agree: no" in out, out


async def test_the_jobs_refuse_settings_that_would_drop_usage(isolated: Settings) -> None:
    """Billing review H2: Stripe's grace beyond its 72 h, or a close before the late horizon, stops the jobs
    at start-up with what to change."""
    code, out = run_tally(["jobs", "run", "stripe_report"], isolated, TALLY_STRIPE_INVOICE_GRACE_S="300000")
    assert code == 2 and "TALLY_STRIPE_INVOICE_GRACE_S (300000)" in out and "72 hours" in out, out
    code, out = run_tally(["jobs"], isolated, TALLY_CLOSE_GRACE_S="3600", TALLY_LATE_HORIZON_S="86400")
    assert code == 2 and "set TALLY_CLOSE_GRACE_S to at least 86400" in out, out


async def test_a_subscription_without_a_period_is_logged_and_counted_and_the_others_are_billed(
        isolated: Settings, db: asyncpg.Connection) -> None:
    """Billing review L5: a subscription whose period cannot be computed (it starts next week) is logged and
    counted in the run's figures, and the run bills the other subscriptions."""
    settings = metered(isolated)
    tenant, customer = f"t-{uuid.uuid4().hex[:8]}", f"cus_{uuid.uuid4().hex[:10]}"
    await billed_subject(db, tenant, "early", customer, included=0)
    await subscribe(db, tenant, Subscription(subject="later", plan_id="metered", stripe_customer_id=customer,
                                             start_date=date.today() + timedelta(days=7)))
    with stripe_double() as double, running("processor", ["process"], settings):
        await counted(settings, db, calls(tenant, "early", 2) + calls(tenant, "later", 5, first=100))
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, TALLY_STRIPE_API_BASE=double.url)
    assert code == 0 and "'period_errors': 1" in out, out
    assert f"{tenant}/later: no billing period, not reported" in out, out
    assert [(r["subject"], r["value"], r["status"]) for r in await _report_rows(db, tenant)] == [("early", 2, "sent")]


async def test_a_stripe_outage_across_the_grace_never_stamps_into_the_finalised_invoice(
        isolated: Settings, db: asyncpg.Connection) -> None:
    """Billing reviews H2 and H3 together: Stripe is down while a finished period's last rows should go out.
    Afterwards the row never handed to Stripe is planned again as an adjustment on the next invoice; the row
    that was tried may have arrived, so it is held until a person resolves it; nothing lands in the
    finalised invoice and everything is billed once."""
    settings = metered(isolated)
    b = await _boundary(db, Plan(id="u", report="usage", meters=[PlanMeter(meter="api_calls", included=0),
                                                                  PlanMeter(meter="tokens", included=0)]))
    with stripe_double() as double, running("processor", ["process"], settings):
        double.periods[(b.account, b.customer)] = [(b.previous.start, b.previous.end), (b.current.start, b.current.end)]
        produce(settings, _events(b, [b.at(-timedelta(hours=2, seconds=i)) for i in range(3)], 0)
                + _events(b, [b.at(-timedelta(hours=2, seconds=i)) for i in range(2)], 10, ["5", "5"]))
        await wait_for(lambda: drained(settings, db), 60, "the processor")
        double.failing = True
        async with reporting(settings, double, stripe_breaker_fail_max=1) as run:
            await run(b.at(timedelta(minutes=20)))  # within the grace; the first row is tried, the breaker opens
        double.failing = False
        async with reporting(settings, double) as run:  # the worker restarted, Stripe is back
            after = await run(b.at(timedelta(hours=2)))  # the invoice is final
            await run(b.at(timedelta(hours=2, minutes=5)))
            rows = await _report_rows(db, b.tenant)
            assert after["held"] == 1 and after["superseded"] == 1, after
            held = next(r for r in rows if r["status"] == "held")
            assert "finalised" in held["error"]
            assert await resolve(db, b.tenant, held["id"], stripe_has_it=False)
            await run(b.at(timedelta(hours=2, minutes=10)))
    assert double.late() == []
    assert double.invoiced(b.account, b.customer, b.previous.start, b.previous.end) == 0
    assert double.invoiced(b.account, b.customer, b.current.start, b.current.end) == 3 + 10
    rows = await _report_rows(db, b.tenant)
    assert sorted((r["meter"], r["kind"], r["status"]) for r in rows if r["status"] == "sent") == [
        ("api_calls", "adjustment", "sent"), ("tokens", "adjustment", "sent")]
    assert all(r["period_label"] == b.previous.label for r in rows)
