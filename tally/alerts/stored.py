"""Rules as stored, with who owns each (`origin`: the API or a rules file) and their version. Target URLs and
webhook secrets are sealed in the stored definition (sealed/): a database dump does not hand them out.

Whoever changes a rule first claims its id for the transaction, so a POST racing a POST, or an API edit racing
a file apply, is decided one after the other: the second sees what the first wrote.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import orjson

from tally.alerts import metrics
from tally.schemas.alerts import AlertRule
from tally.sealed import SecretBox

log = logging.getLogger("tally.alerts")

LOCK_CLASS = 5050  # the first key of the two-int advisory lock: one tenant's rule id

_COLUMNS = "id, origin, version, updated_at, definition::text as definition"


def _targets(body: dict[str, Any], change: Any) -> dict[str, Any]:
    for target in body.get("targets", []):
        for name in ("url", "secret"):
            if isinstance(target.get(name), str):
                target[name] = change(target[name])
    return body


def sealed(rule: AlertRule, box: SecretBox) -> str:
    """The definition as stored: the rule with its targets' URLs and secrets sealed."""
    return orjson.dumps(_targets(rule.model_dump(mode="json", by_alias=True), box.seal)).decode()


def rule_of(definition: str, box: SecretBox) -> AlertRule:
    """A stored definition as a rule, its targets opened; ValueError (ValidationError, Unreadable) if it is no
    longer a valid rule."""
    return AlertRule.model_validate(_targets(orjson.loads(definition), box.open))


def resealed(definition: str, box: SecretBox) -> str | None:
    """The definition with every target secret sealed under the current key, or None when it already is."""
    body = orjson.loads(definition)
    if not any(box.stale(v) for t in body.get("targets", []) for k, v in t.items() if k in ("url", "secret")
               and isinstance(v, str)):
        return None
    return orjson.dumps(_targets(body, box.reseal)).decode()


def shown(row: asyncpg.Record, box: SecretBox) -> dict[str, Any]:
    """A stored rule as the API shows it: targets masked (AlertRule.public), its origin and version."""
    return {**rule_of(row["definition"], box).public(), "origin": row["origin"], "version": row["version"],
            "updated_at": row["updated_at"].isoformat()}


async def claim(conn: asyncpg.Connection, tenant: str, rule_id: str) -> asyncpg.Record | None:
    """Hold the id until the transaction ends (even one not yet stored); its row, if any."""
    await conn.execute("select pg_advisory_xact_lock($1, hashtext($2))", LOCK_CLASS,
                       orjson.dumps([tenant, rule_id]).decode())
    return await one(conn, tenant, rule_id)


async def one(conn: asyncpg.Connection | asyncpg.Pool, tenant: str, rule_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select {_COLUMNS} from alert_rules where tenant = $1 and id = $2", tenant, rule_id)


async def listing(conn: asyncpg.Connection | asyncpg.Pool, tenant: str) -> list[asyncpg.Record]:
    return await conn.fetch(f"select {_COLUMNS} from alert_rules where tenant = $1 order by id", tenant)


async def count(conn: asyncpg.Connection, tenant: str) -> int:
    return await conn.fetchval("select count(*) from alert_rules where tenant = $1", tenant)


async def using(conn: asyncpg.Connection, tenant: str, meter: str) -> list[str]:
    """The tenant's rules that read the meter."""
    rows = await conn.fetch("select id from alert_rules where tenant = $1 and definition->'measure'->>'meter' = $2"
                            " order by id", tenant, meter)
    return [f"alert rule {r['id']!r}" for r in rows]


async def delete(conn: asyncpg.Connection, tenant: str, rule_ids: list[str]) -> None:
    await conn.execute("delete from alert_rules where tenant = $1 and id = any($2::text[])", tenant, rule_ids)


async def save(conn: asyncpg.Connection, tenant: str, rule: AlertRule, box: SecretBox, origin: str = "api") -> bool:
    """Create or replace; True when the rule is new."""
    return await conn.fetchval(
        "insert into alert_rules (tenant, id, definition, origin) values ($1, $2, $3::jsonb, $4)"
        " on conflict (tenant, id) do update set definition = excluded.definition, origin = excluded.origin,"
        " version = alert_rules.version + 1, updated_at = now()"
        " returning version = 1", tenant, rule.id, sealed(rule, box), origin)


async def load(conn: asyncpg.Connection | asyncpg.Pool, box: SecretBox,
               tenant: str | None = None) -> dict[str, list[AlertRule]]:
    """Every tenant's rules (or one tenant's), in id order. A stored rule that is no longer valid (written by an
    older version, or sealed under a key since dropped) is skipped, logged and counted: it never stops the others."""
    rows = await conn.fetch("select tenant, id, definition::text as definition from alert_rules"
                            " where $1::text is null or tenant = $1 order by tenant, id", tenant)
    out: dict[str, list[AlertRule]] = {}
    for row in rows:
        try:
            out.setdefault(row["tenant"], []).append(rule_of(row["definition"], box))
        except ValueError as exc:  # ValidationError, Unreadable, broken JSON
            metrics.SKIPPED.labels("rule").inc()
            log.warning("rule %s/%s is skipped: it is not a valid rule (%s)", row["tenant"], row["id"],
                        type(exc).__name__)
    return out
