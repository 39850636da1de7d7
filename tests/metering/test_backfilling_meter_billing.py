"""A tenant meter whose backfill is not done has a partial figure: the Stripe report sends nothing of it and the
period close does not freeze a period that bills it; once the backfill is done, both go ahead with the whole figure
(ADR 0140)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import asyncpg

from tally.billing.accounts import set_account
from tally.settings import Settings
from tests.metering.helpers import account_of, metered, run_tally
from tests.metering.meters_helpers import backfilled, new_version
from tests.metering.stripe_double import stripe_double
from tests.metering.test_period_close import _calls
from tests.metering.test_usage_api import _zone_past_midnight
from tests.processor.helpers import drained, produce, wait_for
from tests.support import running
from tally.usage.periods import period_at, previous
from tally.usage.plans import Plan, PlanMeter, Subscription, save_plan, subscribe

OWN_CALLS = {"event_type": "api.call", "aggregation": "COUNT", "windows": ["hour", "day"]}


async def test_a_backfilling_meter_is_neither_reported_nor_frozen(isolated: Settings, db: asyncpg.Connection) -> None:
    settings = metered(isolated).model_copy(update={"meters_poll_s": 0.2})
    tenant, subject, customer = f"t-{uuid.uuid4().hex[:8]}", "acme", f"cus_{uuid.uuid4().hex[:10]}"
    now = datetime.now(timezone.utc)
    zone = _zone_past_midnight(now)
    today = now.astimezone(ZoneInfo(zone)).date()
    boundary = datetime.combine(today, datetime.min.time(), tzinfo=ZoneInfo(zone)).astimezone(timezone.utc)
    await set_account(db, tenant, account_of(tenant))
    vid = await new_version(db, tenant, "own_calls", 1, OWN_CALLS)
    await save_plan(db, tenant, Plan(id="p", meters=[PlanMeter(meter="own_calls", included=2)]))
    sub = Subscription(subject=subject, plan_id="p", stripe_customer_id=customer, anchor_day=today.day,
                       time_zone=zone, start_date=today - timedelta(days=60))
    await subscribe(db, tenant, sub)
    previous_period = previous(sub.anchor(), period_at(sub.anchor(), now))
    env = {"TALLY_CLOSE_GRACE_S": "60", "TALLY_LATE_HORIZON_S": "60"}
    with stripe_double() as double, running("processor", ["process"], settings):
        double.periods[(account_of(tenant), customer)] = [(previous_period.start, boundary)]
        env["TALLY_STRIPE_API_BASE"] = double.url
        produce(settings, _calls(tenant, subject, [boundary - timedelta(hours=2, minutes=i) for i in range(5)], 0))
        await wait_for(lambda: drained(settings, db), 60, "the processor")

        for job in ("stripe_report", "period_close"):
            code, out = run_tally(["jobs", "run", job], settings, **env)
            assert code == 0, out
        assert await db.fetchval("select count(*) from period_usage where tenant = $1", tenant) == 0
        assert await db.fetchval("select count(*) from stripe_reports where tenant = $1", tenant) == 0
        assert double.for_customer(customer) == []

        await backfilled(settings, db, tenant, [vid], **env)
        for job in ("stripe_report", "period_close"):
            code, out = run_tally(["jobs", "run", job], settings, **env)
            assert code == 0, out
    frozen = await db.fetch("select period_end, used, overage from period_usage where tenant = $1"
                            " order by period_end", tenant)
    assert [(r["period_end"], r["used"], r["overage"]) for r in frozen][-1] == (boundary, 5, 3)
    assert sum(int(s.value) for s in double.for_customer(customer)) == 3
