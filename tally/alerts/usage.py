"""Usage alerts through the alert lifecycle. The jobs worker records each threshold a subject crosses in a
period (tally/usage/alerts.py, once per period and included quantity); here each becomes the firing of rule
`usage:<meter>:<threshold>` for the group {subject}, delivered to the tenant's usage Slack channel and published
like every transition, and resolves (published, not sent to Slack) when its period ends or a newer alert of the
same rule and subject (the next period's, or the same period's after a plan change) takes its place. The window
is the period, not a sliding one: `window_s` is 0 and `detail` names the period. The colon keeps these rule ids
apart from users' rules.

Rows are taken up oldest first and each incident is closed before the next opens, so across a period boundary
the old period resolves before the new one fires, and the new one stays firing (billing review L1). The tenant's
Slack URL is used as stored: one that cannot be used becomes a `refused` delivery with its reason, shown in
`GET /v1/alerts`, never a stop (security review H1).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import asyncpg

from tally.alerts import ledger
from tally.alerts.lifecycle import Standing
from tally.sealed import SecretBox, Unreadable

_OPEN = """
select a.*, t.at as fired_at
from usage_alerts a join alert_transitions t on t.tenant = a.tenant and t.id = a.fired_transition
where a.resolved_transition is null and {} order by a.id {}
"""
_ENDED = _OPEN.format("a.period_end <= $1", "limit 200 for update of a skip locked")
_SUPERSEDED = _OPEN.format("a.tenant = $1 and a.subject = $2 and a.meter = $3 and a.threshold = $4 and a.id < $5",
                           "for update of a")

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
                targets: list[ledger.Destination]) -> ledger.Transition:
    included = Decimal(row["included"])
    return ledger.Transition(
        kind, f"{row['threshold']}% of included {row['meter']}", Decimal(row["used"]),
        included * row["threshold"] / 100, ">=", 0, at, fired_at, targets,
        {"meter": row["meter"], "threshold_percent": row["threshold"], "included": str(included),
         "period_start": row["period_label"].isoformat(), "period_end": row["period_end"].isoformat(),
         "usage_alert_id": row["id"]})


def _slack(row: asyncpg.Record, box: SecretBox) -> list[ledger.Destination]:
    if not row["slack_webhook_url"]:
        return []
    try:
        return [ledger.Destination("slack", box.open(row["slack_webhook_url"]))]
    except Unreadable as exc:
        return [ledger.Destination("slack", None, problem=str(exc))]


async def _resolve(conn: asyncpg.Connection, row: asyncpg.Record, now: datetime, box: SecretBox) -> None:
    group = _group(row)
    await conn.execute("delete from alert_states where tenant = $1 and rule_id = $2 and group_key = $3",
                       group.tenant, group.rule_id, group.key)
    resolved = await ledger.record(conn, group, _transition(row, "resolved", now, row["fired_at"], []), box)
    await conn.execute("update usage_alerts set resolved_transition = $2 where tenant = $3 and id = $1", row["id"],
                       resolved, row["tenant"])


async def take_up(pool: asyncpg.Pool, now: datetime, box: SecretBox, epoch: int | None = None) -> int:
    """Fire the new usage alerts, each after resolving the one it takes the place of, and resolve those whose
    period ended; returns the transitions recorded. The usage_alerts rows, locked and marked in the same
    transaction, keep each firing and resolution to one."""
    recorded = 0
    async with pool.acquire() as conn, conn.transaction():
        if epoch is not None:
            await ledger.fence(conn, epoch)
        for row in await conn.fetch(_NEW):
            for older in await conn.fetch(_SUPERSEDED, row["tenant"], row["subject"], row["meter"], row["threshold"],
                                          row["id"]):
                await _resolve(conn, older, now, box)
                recorded += 1
            group = _group(row)
            await conn.execute("delete from alert_states where tenant = $1 and rule_id = $2 and group_key = $3",
                               group.tenant, group.rule_id, group.key)
            await ledger.move(conn, group, None, Standing("firing", row["created_at"], now))
            fired = await ledger.record(conn, group, _transition(row, "firing", now, now, _slack(row, box)), box)
            await conn.execute("update usage_alerts set taken_up = true, fired_transition = $2"
                               " where tenant = $3 and id = $1", row["id"], fired, row["tenant"])
            recorded += 1
        for row in await conn.fetch(_ENDED, now):
            await _resolve(conn, row, now, box)
            recorded += 1
    return recorded
