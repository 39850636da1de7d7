"""`tally alerts` as a process against one tenant's bad data and a PostgreSQL outage: it never exits, and every
other tenant's alerts still go out (security review H1, issue: a PostgreSQL restart stopped alerting for good)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from datetime import date, datetime, timedelta, timezone

import asyncpg

from tally.settings import Settings
from tests.alerting.helpers import add_rule, transitions
from tests.alerting.receivers import receiver
from tests.processor.helpers import wait_for
from tests.processor.scratch_pg import scratch_postgres
from tests.support import TallyProcess, free_port, wait_until


async def _crossed(db: asyncpg.Connection, tenant: str, slack_url: str) -> None:
    """A subject past 80%, and the tenant's Slack URL written as rows from before the API checked it are."""
    await db.execute("insert into usage_settings (tenant, slack_webhook_url) values ($1, $2)", tenant, slack_url)
    await db.execute("insert into usage_alerts (tenant, subject, meter, period_label, period_end, threshold, used,"
                     " included) values ($1, 's1', 'api_calls', $2, $3, 80, 9, 10)",
                     tenant, date.today().replace(day=1), datetime.now(timezone.utc) + timedelta(days=3))


async def test_a_bad_slack_url_is_refused_and_another_tenant_still_alerted(alone: Settings,
                                                                           alone_db: asyncpg.Connection) -> None:
    db = alone_db
    bad, good = f"bad-{uuid.uuid4().hex[:6]}", f"good-{uuid.uuid4().hex[:6]}"
    port = free_port()
    with receiver() as slack:
        await _crossed(db, bad, "http://")  # first in line: the alert the old worker died on
        await _crossed(db, good, f"{slack.url}/services/T/B/good")
        alerts = TallyProcess("alerts", ["alerts"], alone, TALLY_ALERTS_METRICS_PORT=str(port))
        try:
            await asyncio.to_thread(wait_until, lambda: bool(slack.at("/services/T/B/good")), 60, 0.1,
                                    "the other tenant's Slack message")

            async def refused() -> bool:
                return await db.fetchval(
                    "select d.status from alert_deliveries d join alert_transitions t on t.id = d.transition_id"
                    " where t.tenant = $1", bad) == "refused"

            await wait_for(refused, 30, "the bad URL's delivery to be refused")
            await asyncio.sleep(2)  # more rounds
            assert alerts.alive(), alerts.output()
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            assert 'tally_alerts_deliveries_total{kind="slack",outcome="refused"} 1.0' in metrics
        finally:
            alerts.stop()
    row = await db.fetchrow("select d.last_error, d.url, d.endpoint from alert_deliveries d join alert_transitions t"
                            " on t.id = d.transition_id where t.tenant = $1", bad)
    assert (row["last_error"], row["url"]) == ("the URL names no host", None)
    sealed = await db.fetch("select slack_webhook_url from usage_settings")
    assert all(r["slack_webhook_url"].startswith("sealed:") for r in sealed)  # sealed at the evaluator's start


async def test_the_evaluator_rides_out_a_postgresql_outage(alone: Settings) -> None:
    scratch = scratch_postgres(alone)
    pg = await asyncio.to_thread(scratch.__enter__)  # it migrates with asyncio.run: not on this loop
    try:
        settings = alone.model_copy(update={"database_url": pg.url})
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        db = await asyncpg.connect(pg.url)
        try:
            await add_rule(db, tenant, id="quiet", filter={"event_type": "heartbeat"}, comparison="<", threshold=3,
                           every="1s")
        finally:
            await db.close()
        alerts = TallyProcess("alerts", ["alerts"], settings, TALLY_ALERTS_METRICS_PORT="0")
        try:
            async def fired(rule: str) -> bool:
                try:
                    conn = await asyncpg.connect(pg.url, timeout=5)
                except (OSError, asyncpg.PostgresError):
                    return False
                try:
                    return (rule, "{}", "firing") in await transitions(conn, tenant)
                finally:
                    await conn.close()

            await wait_for(lambda: fired("quiet"), 60, "the first firing")
            await asyncio.to_thread(pg.stop)
            stopped = time.monotonic()
            await asyncio.sleep(15)
            assert alerts.alive(), alerts.output()
            await asyncio.to_thread(pg.start)
            db = await asyncpg.connect(pg.url)
            try:
                await add_rule(db, tenant, id="quiet-too", filter={"event_type": "heartbeat"}, comparison="<",
                               threshold=3, every="1s")
            finally:
                await db.close()
            await wait_for(lambda: fired("quiet-too"), 90, "a rule added after the outage to fire")
            assert time.monotonic() - stopped < 120
            assert alerts.alive(), alerts.output()
            assert "standing by" in alerts.output()
            db = await asyncpg.connect(pg.url)
            try:
                got = await transitions(db, tenant)
            finally:
                await db.close()
            assert sorted(got) == [("quiet", "{}", "firing"), ("quiet-too", "{}", "firing")]
        finally:
            alerts.stop()
    finally:
        await asyncio.to_thread(scratch.__exit__, None, None, None)
