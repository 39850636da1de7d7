"""GET /v1/usage and /v1/usage/history against the real pipeline: figures equal the events posted, per
meter and period, with duplicates, across a period boundary in a non-UTC zone; Redis and PostgreSQL agree."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import redis.asyncio as redis

from tally.settings import Settings
from tests.metering.helpers import metered, pipeline, tenant_keys
from tests.processor.helpers import drained, wait_for
from tally.usage.figures import UsageService
from tally.usage.windows import WindowReader

ZONES = ("America/New_York", "America/Los_Angeles", "America/Sao_Paulo", "Europe/Berlin", "Asia/Dubai",
         "Asia/Shanghai", "Asia/Tokyo", "Australia/Sydney", "Pacific/Auckland")


def _zone_past_midnight(now: datetime) -> str:
    """A real zone whose local midnight was some 10 hours ago, so the last day's events straddle it."""
    return min(ZONES, key=lambda z: abs(now.astimezone(ZoneInfo(z)).hour - 10))


def _event(n: int, type_: str, subject: str, at: datetime, data: dict | None = None) -> dict:
    return {"specversion": "1.0", "id": f"e-{n}", "source": "app", "type": type_, "subject": subject,
            "time": at.isoformat(), "data": data or {}}


async def test_usage_equals_the_events_posted_across_a_period_boundary(isolated: Settings,
                                                                         db: asyncpg.Connection) -> None:
    settings = metered(isolated)
    tenant, admin, writer = await tenant_keys(settings)
    subject = f"cust-{uuid.uuid4().hex[:6]}"
    now = datetime.now(timezone.utc)
    zone = _zone_past_midnight(now)
    tz = ZoneInfo(zone)
    local_today = now.astimezone(tz).date()
    boundary = datetime.combine(local_today, datetime.min.time(), tzinfo=tz).astimezone(timezone.utc)
    # events from 20 h ago to now: some before local midnight (previous period), some after
    times = [now - timedelta(minutes=50 * i + 1) for i in range(24)]
    events = [_event(i, "api.call", subject, t) for i, t in enumerate(times)]
    events += [_event(100 + i, "llm.completion", subject, t, {"tokens": 10 + i / 4}) for i, t in enumerate(times)]
    events.append(_event(999, "api.call", "someone-else", now))

    with pipeline(settings) as gw:
        async with gw.client(admin) as api, gw.client(writer) as writes:
            plan = {"id": "pro", "meters": [
                {"meter": "api_calls", "included": 10, "limit_mode": "soft", "overage_price": "0.01"},
                {"meter": "tokens", "included": "100.5", "limit_mode": "soft"}]}
            assert (await api.post("/v1/plans", json=plan)).status_code == 201
            sub = {"plan_id": "pro", "stripe_customer_id": "cus_1", "anchor_day": local_today.day,
                   "time_zone": zone, "start_date": (local_today - timedelta(days=90)).isoformat()}
            answer = await api.put(f"/v1/subscriptions/{subject}", json=sub)
            assert answer.status_code == 200, answer.text
            assert (await writes.get(f"/v1/usage?subject={subject}")).status_code == 403
            for e in events + events[:5]:  # the first five twice: duplicates count once
                assert (await writes.post("/v1/events", json=e)).status_code == 202
            await wait_for(lambda: drained(settings, db), 60, "the processor")

            current = (await api.get("/v1/usage", params={"subject": subject})).json()
            previous = (await api.get("/v1/usage", params={"subject": subject, "period": "previous"})).json()
            history = (await api.get("/v1/usage/history", params={"subject": subject})).json()
            one = (await api.get("/v1/usage", params={"subject": subject, "meter": "tokens"})).json()
            missing = await api.get("/v1/usage", params={"subject": "nobody"})

    assert missing.status_code == 404
    after = [i for i, t in enumerate(times) if t >= boundary]
    before = [i for i, t in enumerate(times) if t < boundary]
    assert after and before, "the events must straddle the period boundary"

    def expect(indexes: list[int]) -> tuple[int, Decimal]:
        return len(indexes), sum((Decimal(10) + Decimal(i) / 4 for i in indexes), Decimal(0))

    for answer, indexes in ((current, after), (previous, before)):
        calls, tokens = expect(indexes)
        figures = {m["meter"]: m for m in answer["meters"]}
        assert Decimal(figures["api_calls"]["used"]) == calls
        assert Decimal(figures["api_calls"]["overage"]) == max(calls - 10, 0)
        assert Decimal(figures["api_calls"]["remaining"]) == max(10 - calls, 0)
        assert Decimal(figures["tokens"]["used"]) == tokens
        assert figures["tokens"]["limit_mode"] == "soft"
        assert figures["api_calls"]["as_of"] is not None
    assert datetime.fromisoformat(current["period_start"]) == boundary
    assert current["meters"][0]["period_end"] == current["period_end"]
    assert [m["meter"] for m in one["meters"]] == ["tokens"]
    days = {m["meter"]: m["days"] for m in history["meters"]}
    assert days["api_calls"][0]["date"] == local_today.isoformat()
    assert Decimal(days["api_calls"][0]["used"]) == len(after)

    # The same answers from PostgreSQL alone and from Redis alone (for the windows it caches).
    client = redis.Redis.from_url(settings.redis_url)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        from_redis = WindowReader(pool, client, settings.redis_prefix, settings.redis_counter_ttl_s)
        from_pg = WindowReader(pool, None, settings.redis_prefix, settings.redis_counter_ttl_s)
        for spec in ("current", "previous"):
            cached = await UsageService(pool, from_redis).usage(tenant, subject, spec=spec)
            assert from_redis.source == "redis"
            assert await UsageService(pool, from_pg).usage(tenant, subject, spec=spec) == cached
            assert cached == (current if spec == "current" else previous)
        broken = WindowReader(pool, redis.Redis(port=1), settings.redis_prefix, settings.redis_counter_ttl_s)
        assert await UsageService(pool, broken).usage(tenant, subject) == current
        assert broken.source == "postgres"
    finally:
        await pool.close()
        await client.aclose()


async def test_plan_and_subscription_are_validated(isolated: Settings) -> None:
    settings = metered(isolated)
    _, admin, _ = await tenant_keys(settings)
    with pipeline(settings) as gw:
        async with gw.client(admin) as api:
            bad_plan = await api.post("/v1/plans", json={"id": "x", "meters": [{"meter": "a", "included": -1}]})
            assert bad_plan.status_code == 400
            assert bad_plan.headers["content-type"] == "application/problem+json"
            unknown = await api.put("/v1/subscriptions/s", json={"plan_id": "nope", "start_date": "2026-01-01"})
            assert unknown.status_code == 404
            await api.post("/v1/plans", json={"id": "p", "meters": [{"meter": "api_calls", "included": 1}]})
            india = await api.put("/v1/subscriptions/s", json={"plan_id": "p", "start_date": "2026-01-01",
                                                               "time_zone": "Asia/Kolkata"})
            assert india.status_code == 400
            assert "whole-hour" in india.text
            listed = (await api.get("/v1/plans")).json()["plans"]
            assert [p["id"] for p in listed] == ["p"]
            assert httpx.codes.is_success((await api.get("/openapi.json")).status_code)
