"""The README's "Usage and billing" walk-through runs as written against a gateway, a processor and a jobs worker
of the test's own, started once with no meters of the tenant's (only addresses, the tally command and the tenant
swapped): the tenant creates its meter, plan and subscriber through the API, with no restart and no exported
variable, and sees what the comments promise."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from tally.settings import Settings
from tests.gateway.helpers import start_gateway
from tests.support import readme_walkthrough, run_walkthrough, running


async def test_the_walkthrough_runs_and_shows_usage_alerts_and_a_stripe_report(isolated: Settings,
                                                                               db: asyncpg.Connection) -> None:
    [walk] = [b for b in readme_walkthrough("Usage and billing") if "tally keys create" in b]
    settings = isolated.model_copy(update={"meters": "", "meters_file": "", "jobs_metrics_port": 0,
                                           "processor_metrics_port": 0})
    tenant = f"walk-{uuid.uuid4().hex[:8]}"
    with start_gateway("gateway", settings) as gw, running("processor", ["process"], settings), \
            running("jobs", ["jobs"], settings):
        out = await asyncio.to_thread(run_walkthrough, walk, gw.url, tenant, settings)
    assert '"counter":"api_calls","version":1' in out and '"state":"waiting"' in out
    assert f"{tenant} api_calls v1: done" in out
    assert '"used":"7"' in out and '"overage":"2"' in out and '"backfilling":false' in out
    assert '"backfilling":true' not in out
    assert '"threshold":100' in out and '"threshold":80' in out
    assert "stripe_report" in out and ": ok " in out
    assert "0 drift(s)" in out
    row = await db.fetchrow("select value, status, stripe_customer_id from stripe_reports where tenant = $1", tenant)
    assert (row["value"], row["status"], row["stripe_customer_id"]) == (2, "sent", "cus_123")
