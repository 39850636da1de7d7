"""A tenant meter whose backfill is not done has a partial figure: the Stripe report sends nothing of it and the
period close does not freeze a period that bills it; once the backfill is done, both go ahead with the whole figure
(ADR 0140)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg

from tally.settings import Settings
from tests.metering.helpers import account_of, metered, run_tally
from tests.metering.meters_helpers import backfilled, new_version
from tests.metering.stripe_double import stripe_double
from tests.metering.test_period_close import _calls, closing
from tests.processor.helpers import drained, produce, wait_for
from tests.support import running

OWN_CALLS = {"event_type": "api.call", "aggregation": "COUNT", "windows": ["hour", "day"]}


async def test_a_backfilling_meter_is_neither_reported_nor_frozen(isolated: Settings, db: asyncpg.Connection) -> None:
    settings = metered(isolated).model_copy(update={"meters_poll_s": 0.2})
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    vid = await new_version(db, tenant, "own_calls", 1, OWN_CALLS)
    c = await closing(db, tenant, "own_calls")
    subject, customer, boundary = c.subject, c.customer, c.boundary
    env = {"TALLY_CLOSE_GRACE_S": "60", "TALLY_LATE_HORIZON_S": "60"}
    with stripe_double() as double, running("processor", ["process"], settings):
        double.periods[(account_of(tenant), customer)] = [(c.previous_start, boundary)]
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
