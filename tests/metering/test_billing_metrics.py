"""The jobs worker's /metrics shows Stripe report rows by status and the Stripe circuit breaker's state: a row
Stripe refuses (the double answers 403 for an account the platform is not connected to) in
tally_billing_report_rows{status="failed"}, and Stripe failing until the breaker opens in
tally_billing_stripe_breaker_state{state="open"}, with the rows it deferred."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from tally.billing.accounts import set_account
from tally.settings import Settings
from tests.metering.helpers import account_of, billed_subject, calls, metered, run_tally
from tests.metering.stripe_double import StripeDouble, stripe_double
from tests.processor.helpers import drained, produce, wait_for
from tests.support import free_port, running, wait_until
from tests.tally_stack import sample


async def _billable(settings: Settings, db: asyncpg.Connection, tenant: str) -> None:
    """Usage past the plan's allowance, counted; the day's report not yet run (the worker runs it at once)."""
    await billed_subject(db, tenant, "acme", f"cus_{uuid.uuid4().hex[:10]}", included=2)
    with running("processor", ["process"], settings):
        produce(settings, calls(tenant, "acme", 5))
        await wait_for(lambda: drained(settings, db), 90, "the processor")
    await db.execute("delete from job_runs where job in ('stripe_report', 'period_close')")


@contextmanager
def _worker(settings: Settings, double: StripeDouble, **env: str) -> Iterator[str]:
    port = free_port()
    with running("jobs", ["jobs"], settings.model_copy(update={"jobs_metrics_port": port}),
                 TALLY_STRIPE_API_BASE=double.url, **env):
        yield f"http://127.0.0.1:{port}/metrics"


async def test_a_row_stripe_refuses_shows_in_the_report_rows_gauge(isolated: Settings,
                                                                   db: asyncpg.Connection) -> None:
    settings = metered(isolated)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    await _billable(settings, db, tenant)
    await set_account(db, tenant, "acct_typo")
    with stripe_double() as double:
        double.connected = {account_of(tenant)}
        with _worker(settings, double) as url:
            async def shown() -> bool:
                value = sample(url, "tally_billing_report_rows", status="failed")
                return bool(value) and value == await db.fetchval(
                    "select count(*) from stripe_reports where status = 'failed'")

            await wait_for(shown, 120, "the refused row in tally_billing_report_rows")
            assert (await db.fetchval("select status from stripe_reports where tenant = $1", tenant)) == "failed"
            assert (sample(url, "tally_billing_report_sends_total", outcome="failed") or 0) >= 1
            assert sample(url, "tally_billing_stripe_breaker_state", state="closed") == 1  # a refusal is no outage


async def test_stripe_failing_opens_the_breaker_on_the_gauge(isolated: Settings, db: asyncpg.Connection) -> None:
    settings = metered(isolated)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    await _billable(settings, db, tenant)
    with stripe_double() as double:
        double.failing = True
        with _worker(settings, double, TALLY_STRIPE_MAX_ATTEMPTS="1", TALLY_STRIPE_BREAKER_FAIL_MAX="1",
                     TALLY_STRIPE_BREAKER_RESET_S="600") as url:
            wait_until(lambda: sample(url, "tally_billing_stripe_breaker_state", state="open") == 1, 120, 0.5,
                       "the breaker open on tally_billing_stripe_breaker_state")
            assert sample(url, "tally_billing_stripe_breaker_state", state="closed") == 0

            async def deferred() -> bool:
                return bool(sample(url, "tally_billing_report_rows", status="deferred")) and (
                    await db.fetchval("select status from stripe_reports where tenant = $1", tenant)) == "deferred"

            await wait_for(deferred, 60, "the deferred row in tally_billing_report_rows")
        double.failing = False  # Stripe back: the deferred row goes out, so no later test finds it unsent
        code, out = run_tally(["jobs", "run", "stripe_report"], settings, TALLY_STRIPE_API_BASE=double.url)
        assert code == 0, out
    assert await db.fetchval("select status from stripe_reports where tenant = $1", tenant) == "sent"
