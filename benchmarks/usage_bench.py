"""What the usage benchmark needs in its database and Redis: a tenant without hard limits, one with hard
limits configured (its blocks name other subjects, so every event is checked and accepted), and a key
that reads usage for the subjects the load posts for."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import asyncpg
import redis.asyncio as redis

from tally.ingest import auth
from tally.sinks.kafka import caught_up
from tally.settings import Settings
from tally.usage.limits import publish
from tally.usage.plans import Plan, PlanMeter, Subscription, save_plan, subscribe

METERS = "meters: [{slug: api_calls, event_type: api.request, aggregation: COUNT, windows: [hour, day]}]"
SUBJECTS = 500  # the load scripts post for customer-0 .. customer-499
BLOCKED = 1000
# k6 reading `GET /v1/usage` for those subjects at a constant 1,000 req/s, aiming at a 10 ms p95 and p99
READS: dict[str, str | int] = {"SCENARIO": "usage", "MODE": "rate", "RATE": 1000, "P95_MS": 10, "P99_MS": 10,
                               "VUS": 64, "MAX_VUS": 256}


@dataclass(frozen=True)
class Keys:
    free: str
    limited: str
    reader: str


async def prepare(settings: Settings) -> Keys:
    conn = await asyncpg.connect(settings.database_url)
    try:
        _, free = await auth.create_key(conn, "bench-free", "bench", ["events:write"])
        _, reader = await auth.create_key(conn, "bench-free", "bench-reader", ["usage:read"])
        _, limited = await auth.create_key(conn, "bench-limited", "bench", ["events:write"])
        start = date.today() - timedelta(days=20)
        for tenant, mode in (("bench-free", "soft"), ("bench-limited", "hard")):
            await save_plan(conn, tenant, Plan(id="bench", meters=[
                PlanMeter(meter="api_calls", included=10**9, limit_mode=mode)]))
            for n in range(SUBJECTS):
                await subscribe(conn, tenant, Subscription(subject=f"customer-{n}", plan_id="bench", start_date=start))
    finally:
        await conn.close()
    client = redis.Redis.from_url(settings.redis_url)
    until = (datetime.now(timezone.utc) + timedelta(days=30)).isoformat()
    try:
        await publish(client, settings.redis_prefix, {"bench-limited": {
            f"blocked-{n}": [["api.request", "api_calls", until]] for n in range(BLOCKED)}}, 3600)
    finally:
        await client.aclose()
    return Keys(free, limited, reader)


def warm(url: str, key: str) -> None:
    """One read of each subscribed subject: a subject's first read computes its figures (ADR 0046), and the
    timed reads measure the reads after it."""
    for n in range(SUBJECTS):
        request = urllib.request.Request(f"{url}/v1/usage?subject=customer-{n}",
                                         headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()


async def drained(settings: Settings, timeout_s: float) -> bool:
    """True once the processor committed every posted event and published every counter window."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn = await asyncpg.connect(settings.database_url)
        try:
            outbox = await conn.fetchval("select count(*) from counter_outbox")
        finally:
            await conn.close()
        if outbox == 0 and await asyncio.to_thread(caught_up, settings.kafka_bootstrap, settings.consumer_group,
                                                   settings.topics.events):
            return True
        await asyncio.sleep(1)
    return False
