"""The README's "Usage and billing" walk-through runs as written against a gateway, a processor with the
meters it exports and a jobs worker of the test's own (only addresses, the tally command and the tenant
swapped), and prints what its comments promise."""

from __future__ import annotations

import asyncio
import re
import shlex
import uuid

import asyncpg

from tally.settings import Settings
from tests.gateway.helpers import start_gateway
from tests.support import readme_blocks, run_walkthrough, running


async def test_the_walkthrough_runs_and_shows_usage_alerts_and_a_stripe_report(isolated: Settings,
                                                                               db: asyncpg.Connection) -> None:
    setup, walk = readme_blocks("Usage and billing", "sh")
    meters = shlex.split(re.search(r"^export TALLY_METERS=(.*)$", setup, re.M).group(1))[0]
    settings = isolated.model_copy(update={"meters": meters, "jobs_metrics_port": 0, "processor_metrics_port": 0})
    tenant = f"walk-{uuid.uuid4().hex[:8]}"
    with start_gateway("gateway", settings) as gw, running("processor", ["process"], settings), \
            running("jobs", ["jobs"], settings):
        out = await asyncio.to_thread(run_walkthrough, walk, gw.url, tenant, settings)
    assert '"used":"7"' in out and '"overage":"2"' in out
    assert '"threshold":100' in out and '"threshold":80' in out
    assert "stripe_report" in out and ": ok " in out
    assert "0 drift(s)" in out
    row = await db.fetchrow("select value, status, stripe_customer_id from stripe_reports where tenant = $1", tenant)
    assert (row["value"], row["status"], row["stripe_customer_id"]) == (2, "sent", "cus_123")
