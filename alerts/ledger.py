"""What the alert lifecycle writes, inside the caller's transaction: where a rule and group stands, and each
transition with one delivery row per target. The evaluator and the usage take-up write through here alike."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg
import orjson

from alerts.lifecycle import Standing
from schemas.alerts import Target

_SAVE_STANDING = """
insert into alert_states (tenant, rule_id, group_key, grp, status, pending_since, fired_at)
values ($1, $2, $3, $4::jsonb, $5, $6, $7)
on conflict (tenant, rule_id, group_key) do update
set status = excluded.status, pending_since = excluded.pending_since, fired_at = excluded.fired_at, updated_at = now()
"""

_TRANSITION = """
insert into alert_transitions (tenant, rule_id, rule_name, group_key, grp, kind, value, threshold, comparison,
                               window_s, at, fired_at, detail)
values ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12, $13::jsonb)
returning id
"""

_DELIVERY = "insert into alert_deliveries (transition_id, target, kind, url, secret) values ($1, $2, $3, $4, $5)"

_COOLDOWN = """
insert into alert_cooldowns (tenant, rule_id, group_key, resolved_at) values ($1, $2, $3, $4)
on conflict (tenant, rule_id, group_key) do update set resolved_at = excluded.resolved_at
"""


def group_key(values: dict[str, Any]) -> str:
    """The canonical text of a group's values: how states, transitions and cooldowns name a group."""
    return orjson.dumps(values, option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True)
class Group:
    """One rule and group of one tenant."""

    tenant: str
    rule_id: str
    key: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Transition:
    kind: Literal["firing", "resolved"]
    rule_name: str
    value: Decimal | None
    threshold: Decimal
    comparison: str
    window_s: int
    at: datetime
    fired_at: datetime
    targets: list[Target]
    detail: dict[str, Any]


async def stand(conn: asyncpg.Connection, group: Group, standing: Standing | None) -> None:
    """Record where the group stands (None: ok, its row goes)."""
    if standing is None:
        await conn.execute("delete from alert_states where tenant = $1 and rule_id = $2 and group_key = $3",
                           group.tenant, group.rule_id, group.key)
    else:
        await conn.execute(_SAVE_STANDING, group.tenant, group.rule_id, group.key, orjson.dumps(group.values).decode(),
                           standing.status, standing.pending_since, standing.fired_at)


async def record(conn: asyncpg.Connection, group: Group, t: Transition) -> int:
    """The transition and its deliveries (targets copied); a resolution also starts the group's cooldown."""
    transition_id = await conn.fetchval(
        _TRANSITION, group.tenant, group.rule_id, t.rule_name, group.key, orjson.dumps(group.values).decode(),
        t.kind, t.value, t.threshold, t.comparison, t.window_s, t.at, t.fired_at, orjson.dumps(t.detail).decode())
    await conn.executemany(_DELIVERY, [(transition_id, n, target.type, str(target.url), getattr(target, "secret", None))
                                       for n, target in enumerate(t.targets)])
    if t.kind == "resolved":
        await conn.execute(_COOLDOWN, group.tenant, group.rule_id, group.key, t.at)
    return transition_id
