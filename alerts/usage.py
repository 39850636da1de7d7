"""Usage alerts through the alert lifecycle. The jobs worker records each threshold a subject crosses in a
period (usage/alerts.py, once per period); here each becomes the firing of rule `usage:<meter>:<threshold>`
for the group {subject}, delivered to the tenant's usage Slack channel and published like every transition,
and resolves (published, not sent to Slack) when its period ends. The window is the period, not a sliding
one: `window_s` is 0 and `detail` names the period. The colon keeps these rule ids apart from users' rules."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import asyncpg

from alerts import ledger
from alerts.lifecycle import Standing
from schemas.alerts import SlackTarget, Target

_ENDED = """
select a.*, t.at as fired_at from usage_alerts a join alert_transitions t on t.id = a.fired_transition
where a.resolved_transition is null and a.period_end <= $1
order by a.id limit 200 for update of a skip locked
"""

_NEW = """
select a.*, u.slack_webhook_url from usage_alerts a left join usage_settings u using (tenant)
where not a.taken_up order by a.id limit 200 for update of a skip locked
"""


def rule_id(row: asyncpg.Record) -> str:
    return f"usage:{row['meter']}:{row['threshold']}"


def _group(row: asyncpg.Record) -> ledger.Group:
    return ledger.Group(row["tenant"], rule_id(row), ledger.group_key({"subject": row["subject"]}),
                        {"subject": row["subject"]})


def _transition(row: asyncpg.Record, kind: str, at: datetime, fired_at: datetime,
                targets: list[Target]) -> ledger.Transition:
    included = Decimal(row["included"])
    return ledger.Transition(
        kind, f"{row['threshold']}% of included {row['meter']}", Decimal(row["used"]),
        included * row["threshold"] / 100, ">=", 0, at, fired_at, targets,
        {"meter": row["meter"], "threshold_percent": row["threshold"], "included": str(included),
         "period_start": row["period_label"].isoformat(), "period_end": row["period_end"].isoformat(),
         "usage_alert_id": row["id"]})


async def take_up(pool: asyncpg.Pool, now: datetime) -> int:
    """Resolve the usage alerts whose period ended, then fire the new ones; returns the transitions recorded."""
    async with pool.acquire() as conn, conn.transaction():
        ended, new = await conn.fetch(_ENDED, now), await conn.fetch(_NEW)
        for row in ended:
            await ledger.stand(conn, _group(row), None)
            resolved = await ledger.record(conn, _group(row), _transition(row, "resolved", now, row["fired_at"], []))
            await conn.execute("update usage_alerts set resolved_transition = $2 where id = $1", row["id"], resolved)
        for row in new:
            targets: list[Target] = ([SlackTarget(type="slack", url=row["slack_webhook_url"])]
                                     if row["slack_webhook_url"] else [])
            await ledger.stand(conn, _group(row), Standing("firing", row["created_at"], now))
            fired = await ledger.record(conn, _group(row), _transition(row, "firing", now, now, targets))
            await conn.execute("update usage_alerts set taken_up = true, fired_transition = $2 where id = $1",
                               row["id"], fired)
    return len(ended) + len(new)
