"""The hard-limit decision: which subjects have used up a hard-limited allowance this period.

Written to Redis for the gateway in the layout of `tally.schemas.limits`, which the gateway reads.

A refresh reads current-period usage the same way `GET /v1/usage` does, so the bound on events
accepted past a limit is the processing delay plus the refresh and gateway intervals (docs/adr/0042).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import asyncpg
import redis.asyncio as redis

from tally.meters.catalog import Catalog
from tally.schemas.limits import Decision, digest, digest_key, encode_blocks, tenant_key, tenants_key
from tally.usage.periods import Anchor, NotStarted, PeriodError, period_at, skipped
from tally.usage.windows import WindowReader, combine

log = logging.getLogger("tally.usage.limits")

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


async def decide(pool: asyncpg.Pool, reader: WindowReader, catalog: Catalog,
                 now: datetime | None = None) -> Decision:
    """tenant -> subject -> blocks, for every tenant with hard limits (an empty dict when none is blocked). Each
    tenant's meters are its readable ones (`Catalog.readable`): a meter still backfilling blocks on what is counted."""
    now = now or datetime.now(timezone.utc)
    out: Decision = {}
    types_of: dict[str, dict[str, str]] = {}
    for row in await pool.fetch(_HARD, now):
        tenant, subject = row["tenant"], row["subject"]
        if tenant not in types_of:
            types_of[tenant] = {m.slug: m.event_type for m in catalog.readable(tenant).meters}
        types = types_of[tenant]
        subjects = out.setdefault(tenant, {})  # a tenant with hard limits is listed even when none is blocked
        try:
            period = period_at(Anchor(row["anchor_day"], row["time_zone"], row["start_date"]), now)
        except NotStarted:
            continue
        except PeriodError as exc:
            skipped("limits", tenant, subject, exc)
            continue
        windows = await reader.read(tenant, subject, list(row["meters"]), period.start, period.end, now,
                                    counters=catalog.counters(tenant, row["meters"]))
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


async def publish(client: redis.Redis, prefix: str, decision: Decision, ttl_s: int) -> None:
    """Replace the blocks in Redis in one transaction; tenants without hard limits any more are dropped.

    The keys expire after `ttl_s`, so if refreshes stop the gateway stops refusing (it fails open)."""
    known = {t.decode() for t in await client.smembers(tenants_key(prefix))}
    pipe = client.pipeline(transaction=True)
    for tenant in known - decision.keys():
        pipe.delete(tenant_key(prefix, tenant))
    pipe.delete(tenants_key(prefix))
    if decision:
        pipe.sadd(tenants_key(prefix), *decision)
        pipe.expire(tenants_key(prefix), ttl_s)
    for tenant, subjects in decision.items():
        key = tenant_key(prefix, tenant)
        pipe.delete(key)
        if subjects:
            pipe.hset(key, mapping={s: encode_blocks(b) for s, b in subjects.items()})
            pipe.expire(key, ttl_s)
    pipe.set(digest_key(prefix), digest(decision), ex=ttl_s)
    await pipe.execute()


async def refresh(pool: asyncpg.Pool, reader: WindowReader, client: redis.Redis, prefix: str, catalog: Catalog,
                  ttl_s: int) -> int:
    """Decide and publish; returns the number of blocked subjects."""
    decision = await decide(pool, reader, catalog)
    await publish(client, prefix, decision, ttl_s)
    return sum(len(s) for s in decision.values())
