"""`tally maintenance` prunes alert history by retention as it prunes events (security review M4): alert
transitions with their deliveries and usage alerts past their days, never what is still to be published,
delivered or resolved; expired usage links a day after they expire; 0 keeps everything."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta, timezone

import asyncpg

from tally.settings import Settings
from tests.processor.helpers import maintenance


async def _transition(db: asyncpg.Connection, tenant: str, age_days: int, *, published: bool = True,
                      delivery: str | None = "sent") -> int:
    at = datetime.now(timezone.utc) - timedelta(days=age_days)
    tid = await db.fetchval(
        "insert into alert_transitions (tenant, rule_id, rule_name, group_key, grp, kind, threshold, comparison,"
        " window_s, at, fired_at, published_at) values ($1, 'r', 'r', '{}', '{}', 'firing', 1, '>', 60, $2, $2, $3)"
        " returning id", tenant, at, at if published else None)
    if delivery is not None:
        await db.execute("insert into alert_deliveries (tenant, transition_id, target, kind, endpoint, target_digest,"
                         " status) values ($1, $2, 0, 'webhook', 'https://example.com',"
                         " sha256('webhook https://example.com/hook'), $3)", tenant, tid, delivery)
    return tid


async def _usage_alert(db: asyncpg.Connection, tenant: str, age_days: int, fired: int | None,
                       resolved: int | None) -> int:
    created = datetime.now(timezone.utc) - timedelta(days=age_days)
    return await db.fetchval(
        "insert into usage_alerts (tenant, subject, meter, period_label, period_end, threshold, used, included,"
        " created_at, taken_up, fired_transition, resolved_transition) values ($1, $2, 'm', $3, $4, 80, 8, 10, $4,"
        " true, $5, $6) returning id", tenant, uuid.uuid4().hex, date.today(), created, fired, resolved)


async def test_alert_history_and_usage_alerts_are_pruned_by_retention(settings: Settings,
                                                                      db: asyncpg.Connection) -> None:
    tenant = f"history-{uuid.uuid4().hex[:8]}"
    old = await _transition(db, tenant, 40)
    pending = await _transition(db, tenant, 40, delivery="pending")
    unpublished = await _transition(db, tenant, 40, published=False)
    fresh = await _transition(db, tenant, 2)
    fired_old, resolved_old = await _transition(db, tenant, 40), await _transition(db, tenant, 39)
    fired_open = await _transition(db, tenant, 40)
    done_alert = await _usage_alert(db, tenant, 40, fired_old, resolved_old)
    open_alert = await _usage_alert(db, tenant, 40, fired_open, None)
    fresh_alert = await _usage_alert(db, tenant, 2, None, None)
    now = datetime.now(timezone.utc)
    expired, live = [await db.fetchval("insert into usage_links (tenant, subject, key_id, expires_at) values"
                                       " ($1, 's', 'k', $2) returning id", tenant, at)
                     for at in (now - timedelta(days=2), now + timedelta(days=2))]

    kept_all = maintenance(settings, TALLY_ALERT_TRANSITIONS_RETENTION_DAYS="0",
                            TALLY_USAGE_ALERTS_RETENTION_DAYS="0")
    transitions = {r[0] for r in await db.fetch("select id from alert_transitions where tenant = $1", tenant)}
    assert transitions == {old, pending, unpublished, fresh, fired_old, resolved_old, fired_open}, kept_all

    summary = maintenance(settings, TALLY_ALERT_TRANSITIONS_RETENTION_DAYS="30",
                           TALLY_USAGE_ALERTS_RETENTION_DAYS="30")
    transitions = {r[0] for r in await db.fetch("select id from alert_transitions where tenant = $1", tenant)}
    alerts = {r[0] for r in await db.fetch("select id from usage_alerts where tenant = $1", tenant)}
    deliveries = {r[0] for r in await db.fetch(
        "select transition_id from alert_deliveries d join alert_transitions t on t.id = d.transition_id"
        " where t.tenant = $1", tenant)}
    links = {r[0] for r in await db.fetch("select id from usage_links where tenant = $1", tenant)}
    assert transitions == {pending, unpublished, fresh, fired_open}, summary
    assert deliveries == {pending, unpublished, fresh, fired_open}
    assert alerts == {open_alert, fresh_alert} and done_alert not in alerts
    assert links == {live} and expired not in links
    assert "alert transitions pruned: 3" in summary and "usage alerts pruned: 1" in summary, summary
