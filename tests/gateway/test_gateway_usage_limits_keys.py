"""The hard-limit blocks in Redis (security review, lows): a tenant named `tenants` has its own key, not the
set that lists the tenants with hard limits, so its blocks and every other tenant's hold."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import redis.asyncio as redis

from tally.ingest.limits import UsageLimits
from tally.settings import Settings
from tally.usage.limits import publish


async def test_a_tenant_named_tenants_keeps_its_blocks_and_the_others(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    prefix = f"{settings.redis_prefix}{uuid.uuid4().hex[:6]}:"
    now = datetime.now(timezone.utc)
    until = (now + timedelta(days=1)).isoformat()
    try:
        await publish(client, prefix, {"tenants": {"s1": [["api.*", "api_calls", until]]},
                                       "acme": {"s2": [["api.*", "api_calls", until]]}}, 60)
        limits = UsageLimits(client, prefix, 1.0)
        await limits.load()
        refused = [limits.refused(tenant, {"type": "api.call", "subject": subject}, now)
                   for tenant, subject in (("tenants", "s1"), ("acme", "s2"), ("acme", "s1"))]
    finally:
        await client.delete(*[key async for key in client.scan_iter(f"{prefix}*")] or [f"{prefix}none"])
        await client.aclose()
    assert [problem is not None for problem in refused] == [True, True, False]
