"""What `GET /v1/alerts` reads: a tenant's transitions newest first (by id, so a page boundary never moves as
new ones arrive), each with its deliveries, and the rule-groups firing now."""

from __future__ import annotations

from typing import Any, Literal

import asyncpg
import orjson
from pydantic import BaseModel, ConfigDict, Field

from tally.query.filters import Rfc3339
from tally.alerts.transitions import transition

MAX_ACTIVE = 1000


class AlertsQuery(BaseModel):
    """`GET /v1/alerts` filters: `since` inclusive, `until` exclusive, on the transition's time."""

    model_config = ConfigDict(extra="forbid")

    rule_id: str | None = Field(None, min_length=1, max_length=64)
    status: Literal["firing", "resolved"] | None = None
    since: Rfc3339 | None = None
    until: Rfc3339 | None = None
    limit: int = Field(100, ge=1, le=500)
    cursor: str | None = Field(None, max_length=2048, description="the `next` link's cursor")


async def page(conn: asyncpg.Connection, tenant: str, query: AlertsQuery,
               before_id: int | None) -> list[tuple[asyncpg.Record, dict[str, Any]]]:
    """One more than `limit` transitions with ids below `before_id` (the extra one says a next page exists):
    each row, and it as its AlertTransition plus its `deliveries`."""
    rows = await conn.fetch(
        "select * from alert_transitions where tenant = $1 and ($2::text is null or rule_id = $2)"
        " and ($3::text is null or kind = $3) and ($4::timestamptz is null or at >= $4)"
        " and ($5::timestamptz is null or at < $5) and ($6::bigint is null or id < $6)"
        " order by id desc limit $7", tenant, query.rule_id, query.status, query.since, query.until, before_id,
        query.limit + 1)
    sent = await conn.fetch(
        "select transition_id, target, kind, endpoint, status, attempts, last_status, last_error, sent_at"
        " from alert_deliveries where tenant = $1 and transition_id = any($2::bigint[]) order by transition_id, target",
        tenant, [row["id"] for row in rows])
    deliveries: dict[int, list[dict[str, Any]]] = {}
    for d in sent:
        deliveries.setdefault(d["transition_id"], []).append({
            "target": d["target"], "kind": d["kind"], "url": d["endpoint"], "status": d["status"],
            "attempts": d["attempts"], "last_status": d["last_status"], "last_error": d["last_error"],
            "sent_at": d["sent_at"].isoformat() if d["sent_at"] else None})
    return [(row, {**transition(row).model_dump(mode="json"), "deliveries": deliveries.get(row["id"], [])})
            for row in rows]


async def firing(conn: asyncpg.Connection, tenant: str) -> list[dict[str, Any]]:
    """The rule-groups firing now, the latest to fire first (at most MAX_ACTIVE). A usage alert has no rule row:
    its name is its firing's."""
    rows = await conn.fetch(
        "select s.rule_id, coalesce(r.definition->>'name', (select t.rule_name from alert_transitions t"
        "  where t.tenant = s.tenant and t.rule_id = s.rule_id and t.group_key = s.group_key"
        "  order by t.id desc limit 1)) as rule_name, s.grp::text as grp, s.pending_since, s.fired_at"
        " from alert_states s left join alert_rules r on r.tenant = s.tenant and r.id = s.rule_id"
        " where s.tenant = $1 and s.status = 'firing' order by s.fired_at desc, s.rule_id, s.group_key limit $2",
        tenant, MAX_ACTIVE)
    return [{"rule": {"id": row["rule_id"], "name": row["rule_name"]}, "group": orjson.loads(row["grp"]),
             "breaching_since": row["pending_since"].isoformat(), "fired_at": row["fired_at"].isoformat()}
            for row in rows]
