"""The hard-limit decision: which subjects have used up a hard-limited allowance this period.

Written to Redis for the gateway (`tally/ingest/limits.py` reads it; neither imports the other, the keys
are the contract):

- `{prefix}limits:tenants`: a set of the tenants with any hard-limited plan; the gateway checks no
  other tenant's events;
- `{prefix}limits:tenant:{tenant}`: a hash, subject -> JSON list of blocks `[event type glob, meter, period end]`
  (`tenant:` keeps a tenant named `tenants` off the set's key);
- `{prefix}limits-digest`: the SHA-256 of the whole decision, so the gateway copies the blocks again
  only when they changed (a thousand blocks cost it some 10 ms of its event loop to read).

A refresh reads current-period usage the same way `GET /v1/usage` does, so the bound on events
accepted past a limit is the processing delay plus the refresh and gateway intervals (docs/adr/0042).
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone

import asyncpg
import orjson
import redis.asyncio as redis

from tally.meters.definitions import MetersConfig
from tally.usage.periods import Anchor, NotStarted, PeriodError, period_at, skipped
from tally.usage.windows import WindowReader, combine

log = logging.getLogger("tally.usage.limits")

TENANTS = "limits:tenants"
DIGEST = "limits-digest"

# Each subscription with its current plan's hard-limited meters.
_HARD = """
select s.tenant, s.subject, s.plan_id, s.anchor_day, s.time_zone, s.start_date,
       array_agg(pm.meter order by pm.meter) as meters, array_agg(pm.included order by pm.meter) as included
from subscriptions s
join lateral (select plan_id from subscription_plans p where p.tenant = s.tenant and p.subject = s.subject
              and p.effective_at <= $1 order by effective_at desc limit 1) cur on true
join plan_meters pm on pm.tenant = s.tenant and pm.plan_id = cur.plan_id and pm.limit_mode = 'hard'
group by s.tenant, s.subject
"""


def tenant_key(prefix: str, tenant: str) -> str:
    return f"{prefix}limits:tenant:{tenant}"


async def decide(pool: asyncpg.Pool, reader: WindowReader, meters: MetersConfig,
                 now: datetime | None = None) -> dict[str, dict[str, list[list[str]]]]:
    """tenant -> subject -> blocks, for every tenant with hard limits (an empty dict when none is blocked)."""
    now = now or datetime.now(timezone.utc)
    types = {m.slug: m.event_type for m in meters.meters}
    out: dict[str, dict[str, list[list[str]]]] = {}
    for row in await pool.fetch(_HARD, now):
        tenant, subject = row["tenant"], row["subject"]
        subjects = out.setdefault(tenant, {})  # a tenant with hard limits is listed even when none is blocked
        try:
            period = period_at(Anchor(row["anchor_day"], row["time_zone"], row["start_date"]), now)
        except NotStarted:
            continue
        except PeriodError as exc:
            skipped("limits", tenant, subject, exc)
            continue
        windows = await reader.read(tenant, subject, list(row["meters"]), period.start, period.end, now)
        blocks = []
        for meter, included in zip(row["meters"], row["included"]):
            if meter not in types:
                log.warning("plan %s/%s limits meter %s, which is not configured", tenant, row["plan_id"], meter)
                continue
            if combine(list(windows[meter].values())) >= included:
                blocks.append([types[meter], meter, period.end.isoformat()])
        if blocks:
            subjects[subject] = blocks
    return out


async def publish(client: redis.Redis, prefix: str, decision: dict[str, dict[str, list[list[str]]]],
                  ttl_s: int) -> None:
    """Replace the blocks in Redis in one transaction; tenants without hard limits any more are dropped.

    The keys expire after `ttl_s`, so if refreshes stop the gateway stops refusing (it fails open)."""
    known = {t.decode() for t in await client.smembers(prefix + TENANTS)}
    pipe = client.pipeline(transaction=True)
    for tenant in known - decision.keys():
        pipe.delete(tenant_key(prefix, tenant))
    pipe.delete(prefix + TENANTS)
    if decision:
        pipe.sadd(prefix + TENANTS, *decision)
        pipe.expire(prefix + TENANTS, ttl_s)
    for tenant, subjects in decision.items():
        key = tenant_key(prefix, tenant)
        pipe.delete(key)
        if subjects:
            pipe.hset(key, mapping={s: orjson.dumps(b) for s, b in subjects.items()})
            pipe.expire(key, ttl_s)
    pipe.set(prefix + DIGEST, hashlib.sha256(orjson.dumps(decision, option=orjson.OPT_SORT_KEYS)).hexdigest(),
             ex=ttl_s)
    await pipe.execute()


async def refresh(pool: asyncpg.Pool, reader: WindowReader, client: redis.Redis, prefix: str, meters: MetersConfig,
                  ttl_s: int) -> int:
    """Decide and publish; returns the number of blocked subjects."""
    decision = await decide(pool, reader, meters)
    await publish(client, prefix, decision, ttl_s)
    return sum(len(s) for s in decision.values())
