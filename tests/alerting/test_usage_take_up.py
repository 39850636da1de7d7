"""Usage alerts through the alert lifecycle: a recorded threshold fires once, to the tenant's usage Slack
channel, and resolves once when its period ends; the evaluator leaves these rule groups alone."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta, timezone

import asyncpg

from tally.alerts.evaluator import Evaluator
from tally.alerts.usage import take_up
from tally.alerts.windows import MinuteWindows
from tally.meters.fresh import LiveCatalog
from tally.meters.definitions import DEFAULT_METERS
from tally.settings import Settings
from tests.alerting.helpers import BOX, transitions


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
        assert await take_up(pool, now, BOX) == 2
        assert await take_up(pool, now, BOX) == 0
        group = '{"subject":"acme"}'
        assert await transitions(db, tenant) == [("usage:api_calls:80", group, "firing"),
                                                 ("usage:api_calls:100", group, "firing")]
        assert await db.fetchval("select count(*) from alert_deliveries where kind = 'slack'") == 2
        assert await db.fetchval("select count(*) from alert_states where status = 'firing'") == 2

        # A rules evaluator started now neither resolves nor drops the usage groups.
        evaluator = Evaluator(pool, LiveCatalog(DEFAULT_METERS), MinuteWindows(), BOX)
        await evaluator.load(now)
        assert await evaluator.evaluate(now) == 0
        assert await db.fetchval("select count(*) from alert_states") == 2

        assert await take_up(pool, period_end - timedelta(seconds=1), BOX) == 0
        assert await take_up(pool, period_end, BOX) == 2
        assert await take_up(pool, period_end + timedelta(days=1), BOX) == 0
        assert [kind for *_, kind in await transitions(db, tenant)] == ["firing", "firing", "resolved", "resolved"]
        assert await db.fetchval("select count(*) from alert_states") == 0
        row = await db.fetchrow("select t.fired_at, f.at from alert_transitions t join alert_transitions f"
                                " on f.rule_id = t.rule_id and f.kind = 'firing' where t.kind = 'resolved' limit 1")
        assert row["fired_at"] == row["at"]
        assert await db.fetchval("select count(*) from alert_deliveries") == 2  # the resolution is not sent to Slack
    finally:
        await pool.close()


async def _crossed(db: asyncpg.Connection, tenant: str, label: date, end: datetime, threshold: int = 80,
                   included: int = 10) -> None:
    await db.execute("insert into usage_alerts (tenant, subject, meter, period_label, period_end, threshold, used,"
                     " included) values ($1, 'acme', 'api_calls', $2, $3, $4, $5, $5)",
                     tenant, label, end, threshold, included)


async def _active(db: asyncpg.Connection, tenant: str) -> list[tuple[str, str]]:
    return [(r["rule_id"], r["status"]) for r in await db.fetch("select rule_id, status from alert_states"
                                                                " where tenant = $1", tenant)]


async def test_across_a_period_boundary_the_old_resolves_before_the_new_fires(
        alone: Settings, alone_db: asyncpg.Connection) -> None:
    """Billing review L1: `tally alerts` was down over the boundary; both periods' 80% wait to be taken up."""
    db, tenant = alone_db, f"t-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    await _crossed(db, tenant, date(2026, 10, 1), now - timedelta(days=2))
    await _crossed(db, tenant, date(2026, 11, 1), now + timedelta(days=20))
    pool = await asyncpg.create_pool(alone.database_url, min_size=1, max_size=2)
    try:
        assert await take_up(pool, now, BOX) == 3
        assert await take_up(pool, now + timedelta(seconds=5), BOX) == 0
    finally:
        await pool.close()
    kinds = await db.fetch("select kind, detail->>'period_start' as period from alert_transitions where tenant = $1"
                           " order by id", tenant)
    assert [(r["kind"], r["period"]) for r in kinds] == [
        ("firing", "2026-10-01"), ("resolved", "2026-10-01"), ("firing", "2026-11-01")]
    assert await _active(db, tenant) == [("usage:api_calls:80", "firing")]


async def test_after_an_upgrade_the_new_plan_s_threshold_fires_and_the_old_one_resolves(
        alone: Settings, alone_db: asyncpg.Connection) -> None:
    """Billing review L2: 100% of 10 fired; after an upgrade to 50 included, 100% of 50 is a new alert."""
    db, tenant = alone_db, f"t-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    label, end = date.today().replace(day=1), now + timedelta(days=3)
    await _crossed(db, tenant, label, end, 100, 10)
    pool = await asyncpg.create_pool(alone.database_url, min_size=1, max_size=2)
    try:
        assert await take_up(pool, now, BOX) == 1
        await _crossed(db, tenant, label, end, 100, 50)
        assert await db.fetchval("select count(*) from usage_alerts where tenant = $1", tenant) == 2
        assert await take_up(pool, now, BOX) == 2
    finally:
        await pool.close()
    rows = await db.fetch("select kind, detail->>'included' as included from alert_transitions where tenant = $1"
                          " order by id", tenant)
    assert [(r["kind"], r["included"]) for r in rows] == [("firing", "10"), ("resolved", "10"), ("firing", "50")]
    assert await _active(db, tenant) == [("usage:api_calls:100", "firing")]


async def test_a_slack_url_no_worker_can_use_is_a_refused_delivery_not_a_stop(
        alone: Settings, alone_db: asyncpg.Connection) -> None:
    """Security review H1, in-process: stored before the API checked it, `http://` fires and is refused."""
    db, tenant = alone_db, f"t-{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    await db.execute("insert into usage_settings (tenant, slack_webhook_url) values ($1, 'http://')", tenant)
    await _crossed(db, tenant, date.today().replace(day=1), now + timedelta(days=3))
    pool = await asyncpg.create_pool(alone.database_url, min_size=1, max_size=2)
    try:
        assert await take_up(pool, now, BOX) == 1
    finally:
        await pool.close()
    assert await db.fetchval("select count(*) from alert_deliveries where kind = 'slack'") == 1
