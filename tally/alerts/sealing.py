"""Secrets the alerts keep, sealed under the current key: rows written before sealing existed (migration 0075)
and rows sealed under a key being retired are rewritten when an evaluator becomes leader (sealed/)."""

from __future__ import annotations

import logging

import asyncpg
import orjson

from tally.alerts import metrics, stored
from tally.sealed import SecretBox, Unreadable

log = logging.getLogger("tally.alerts")


async def reseal(pool: asyncpg.Pool, box: SecretBox) -> int:
    """Rules, pending deliveries, firing groups' targets and usage Slack URLs; returns how many rows changed. A value no key opens is
    left as it is and logged (its delivery is refused with the reason when it comes up)."""
    changed = 0
    async with pool.acquire() as conn, conn.transaction():
        for row in await conn.fetch("select tenant, id, definition::text as definition from alert_rules for update"):
            try:
                definition = stored.resealed(row["definition"], box)
            except (Unreadable, ValueError):
                _unreadable("rule", row["tenant"])
                continue
            if definition is not None:
                await conn.execute("update alert_rules set definition = $3::jsonb where tenant = $1 and id = $2",
                                   row["tenant"], row["id"], definition)
                changed += 1
        for row in await conn.fetch("select transition_id, target, url, secret, tenant from alert_deliveries"
                                    " where status = 'pending' for update"):
            if any(v is not None and box.stale(v) for v in (row["url"], row["secret"])):
                try:
                    url, secret = (row["url"] and box.reseal(row["url"]), row["secret"] and box.reseal(row["secret"]))
                except Unreadable:
                    _unreadable("delivery", row["tenant"])
                    continue
                await conn.execute("update alert_deliveries set url = $3, secret = $4"
                                   " where tenant = $5 and transition_id = $1 and target = $2",
                                   row["transition_id"], row["target"], url, secret, row["tenant"])
                changed += 1
        for row in await conn.fetch("select tenant, rule_id, group_key, targets::text as targets from alert_states"
                                    " where targets is not null for update"):
            dests = orjson.loads(row["targets"])
            if any(isinstance(d.get(k), str) and box.stale(d[k]) for d in dests for k in ("url", "secret")):
                try:
                    resealed = [{**d, **{k: box.reseal(d[k]) for k in ("url", "secret") if isinstance(d.get(k), str)}}
                                for d in dests]
                except Unreadable:
                    _unreadable("firing group's targets", row["tenant"])
                    continue
                await conn.execute("update alert_states set targets = $4::jsonb where tenant = $1 and rule_id = $2"
                                   " and group_key = $3", row["tenant"], row["rule_id"], row["group_key"],
                                   orjson.dumps(resealed).decode())
                changed += 1
        for row in await conn.fetch("select tenant, slack_webhook_url from usage_settings"
                                    " where slack_webhook_url is not null for update"):
            if box.stale(row["slack_webhook_url"]):
                try:
                    url = box.reseal(row["slack_webhook_url"])
                except Unreadable:
                    _unreadable("usage Slack URL", row["tenant"])
                    continue
                await conn.execute("update usage_settings set slack_webhook_url = $2 where tenant = $1",
                                   row["tenant"], url)
                changed += 1
    if changed:
        log.info("sealed %d stored row(s) under the current key", changed)
    return changed


def _unreadable(what: str, tenant: str) -> None:
    metrics.SKIPPED.labels("sealed value").inc()
    log.warning("a %s of tenant %s is sealed under a key no longer configured; left as it is", what, tenant)
