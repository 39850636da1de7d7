"""Stripe usage reporting: rows written before sending, the same identifier and Idempotency-Key on every
re-send across kill -9 at both crash points, the breaker deferring reports while Stripe fails and sending
them when it recovers, and the request shape against stripe-mock."""

from __future__ import annotations

import uuid
from collections import defaultdict
from decimal import Decimal

import asyncpg

from tally.settings import Settings
from tests.metering.helpers import billed_subject, calls, metered, run_tally
from tests.metering.stripe_double import StripeDouble, stripe_double
from tests.processor.helpers import drained, produce, wait_for
from tests.support import running


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
    tenant, subject, customer = f"t-{uuid.uuid4().hex[:8]}", "acme", f"cus_{uuid.uuid4().hex[:10]}"
    await billed_subject(db, tenant, subject, customer, included=10)
    with stripe_double() as double, running("processor", ["process"], settings):
        base = {"TALLY_STRIPE_API_BASE": double.url}
        produce(settings, calls(tenant, subject, 25))
        await wait_for(lambda: drained(settings, db), 60, "the processor")

        code, out = run_tally(["jobs", "run", "stripe_report"], settings, TALLY_CRASH_AT="report_before_send", **base)
        assert code == -9, out
        assert [(r["value"], r["status"]) for r in await _rows(db, customer)] == [(15, "pending")]
        assert double.for_customer(customer) == []

        produce(settings, calls(tenant, subject, 7, first=100))
        await wait_for(lambda: drained(settings, db), 60, "the processor")
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
        produce(settings, [e for s in subjects for e in calls(tenant, s, 3, first=hash(s) % 1000 * 10)])
        await wait_for(lambda: drained(settings, db), 60, "the processor")

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
    tenant, subject, customer = f"t-{uuid.uuid4().hex[:8]}", "acme", f"cus_{uuid.uuid4().hex[:10]}"
    await billed_subject(db, tenant, subject, customer, included=0, report="usage")
    with running("processor", ["process"], settings):
        produce(settings, calls(tenant, subject, 3))
        await wait_for(lambda: drained(settings, db), 60, "the processor")
    code, out = run_tally(["jobs", "run", "stripe_report"], settings)  # stripe_api_base: stripe-mock
    assert code == 0, out
    assert [(r["value"], r["status"], r["kind"]) for r in await _rows(db, customer)] == [(3, "sent", "usage")]
