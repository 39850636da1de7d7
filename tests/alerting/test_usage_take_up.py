"""Usage alerts through the alert lifecycle: a recorded threshold fires once, to the tenant's usage Slack
channel, and resolves once when its period ends; the evaluator leaves these rule groups alone."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta, timezone

import asyncpg

from alerts.evaluator import Evaluator
from alerts.usage import take_up
from alerts.windows import MinuteWindows
from meters.definitions import DEFAULT_METERS
from tally.settings import Settings
from tests.alerting.helpers import transitions


async def test_fires_once_and_resolves_when_the_period_ends(alone: Settings, alone_db: asyncpg.Connection) -> None:
    db, tenant = alone_db, f"t-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    period_end = now + timedelta(days=3)
    await db.execute("insert into usage_settings (tenant, slack_webhook_url) values ($1, 'http://127.0.0.1:9/s')",
                     tenant)
    for threshold in (80, 100):
        await db.execute("insert into usage_alerts (tenant, subject, meter, period_label, period_end, threshold, used,"
                         " included) values ($1, 'acme', 'api_calls', $2, $3, $4, 10, 10)",
                         tenant, date.today().replace(day=1), period_end, threshold)
    pool = await asyncpg.create_pool(alone.database_url, min_size=1, max_size=2)
    try:
        assert await take_up(pool, now) == 2
        assert await take_up(pool, now) == 0
        group = '{"subject":"acme"}'
        assert await transitions(db, tenant) == [("usage:api_calls:80", group, "firing"),
                                                 ("usage:api_calls:100", group, "firing")]
        assert await db.fetchval("select count(*) from alert_deliveries where kind = 'slack'") == 2
        assert await db.fetchval("select count(*) from alert_states where status = 'firing'") == 2

        # A rules evaluator started now neither resolves nor drops the usage groups.
        evaluator = Evaluator(pool, DEFAULT_METERS, MinuteWindows())
        await evaluator.load(now)
        assert await evaluator.evaluate(now) == 0
        assert await db.fetchval("select count(*) from alert_states") == 2

        assert await take_up(pool, period_end - timedelta(seconds=1)) == 0
        assert await take_up(pool, period_end) == 2
        assert await take_up(pool, period_end + timedelta(days=1)) == 0
        assert [kind for *_, kind in await transitions(db, tenant)] == ["firing", "firing", "resolved", "resolved"]
        assert await db.fetchval("select count(*) from alert_states") == 0
        row = await db.fetchrow("select t.fired_at, f.at from alert_transitions t join alert_transitions f"
                                " on f.rule_id = t.rule_id and f.kind = 'firing' where t.kind = 'resolved' limit 1")
        assert row["fired_at"] == row["at"]
        assert await db.fetchval("select count(*) from alert_deliveries") == 2  # the resolution is not sent to Slack
    finally:
        await pool.close()
