"""Rules as stored, with who owns each (`origin`: the API or a rules file) and their version.

Whoever changes a rule first claims its id for the transaction, so a POST racing a POST, or an API edit racing
a file apply, is decided one after the other: the second sees what the first wrote.
"""

from __future__ import annotations

import asyncpg
import orjson

from schemas.alerts import AlertRule

LOCK_CLASS = 5050  # the first key of the two-int advisory lock: one tenant's rule id

_COLUMNS = "id, origin, version, updated_at, definition::text as definition"


async def claim(conn: asyncpg.Connection, tenant: str, rule_id: str) -> asyncpg.Record | None:
    """Hold the id until the transaction ends (even one not yet stored); its row, if any."""
    await conn.execute("select pg_advisory_xact_lock($1, hashtext($2))", LOCK_CLASS,
                       orjson.dumps([tenant, rule_id]).decode())
    return await one(conn, tenant, rule_id)


async def one(conn: asyncpg.Connection | asyncpg.Pool, tenant: str, rule_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select {_COLUMNS} from alert_rules where tenant = $1 and id = $2", tenant, rule_id)


async def listing(conn: asyncpg.Connection | asyncpg.Pool, tenant: str) -> list[asyncpg.Record]:
    return await conn.fetch(f"select {_COLUMNS} from alert_rules where tenant = $1 order by id", tenant)


async def delete(conn: asyncpg.Connection, tenant: str, rule_ids: list[str]) -> None:
    await conn.execute("delete from alert_rules where tenant = $1 and id = any($2::text[])", tenant, rule_ids)


async def save(conn: asyncpg.Connection, tenant: str, rule: AlertRule, origin: str = "api") -> bool:
    """Create or replace; True when the rule is new."""
    definition = orjson.dumps(rule.model_dump(mode="json", by_alias=True)).decode()
    return await conn.fetchval(
        "insert into alert_rules (tenant, id, definition, origin) values ($1, $2, $3::jsonb, $4)"
        " on conflict (tenant, id) do update set definition = excluded.definition, origin = excluded.origin,"
        " version = alert_rules.version + 1, updated_at = now()"
        " returning version = 1", tenant, rule.id, definition, origin)


async def load(conn: asyncpg.Connection | asyncpg.Pool, tenant: str | None = None) -> dict[str, list[AlertRule]]:
    """Every tenant's rules (or one tenant's), in id order."""
    rows = await conn.fetch("select tenant, definition::text as definition from alert_rules"
                            " where $1::text is null or tenant = $1 order by tenant, id", tenant)
    out: dict[str, list[AlertRule]] = {}
    for row in rows:
        out.setdefault(row["tenant"], []).append(AlertRule.model_validate_json(row["definition"]))
    return out
