"""What the gateway keeps in the shared Redis is bounded, and a busy Redis is not a down Redis (review
2026-11 H1, M2, M6)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import pytest
import redis as redis_sync
import redis.asyncio as redis


from tally.ingest.config import GatewayConfig
from tally.edge.answers import Answer
from tally.ingest.idempotency import REPLAYED, IdempotencyStore, Retention
from tally.ingest.metrics import Metrics
from tally.ingest.redisguard import RedisDown, RedisGuard
from tally.schemas.topics import Topics
from tally.settings import Settings
from tests.gateway.helpers import Gateway, event, start_gateway


@pytest.fixture
def gateway(intake_gateway: Gateway) -> Gateway:
    """Every test here runs over both intake adapters, plain ASGI and Starlette (ADR 121)."""
    return intake_gateway


def _record_key(settings: Settings, tenant: str, route: str, key: str) -> str:
    scoped = hashlib.sha256(f"{tenant}\0{route}\0{key}".encode()).hexdigest()
    return f"{settings.redis_prefix}idem:{scoped}"


async def test_a_small_request_cannot_store_a_large_answer_for_a_day(gateway: Gateway, api_key: tuple[str, str]) -> None:
    tenant, secret = api_key
    junk = b"[" + b",".join([b"{}"] * 1000) + b"]"
    async with gateway.client(secret) as client:
        first = await client.post("/v1/events/batch", content=junk,
                                  headers={"content-type": "application/json", "Idempotency-Key": "junk-1"})
        again = await client.post("/v1/events/batch", content=junk,
                                  headers={"content-type": "application/json", "Idempotency-Key": "junk-1"})
        big = [event(id=f"many-{i}") for i in range(200)]
        accepted = await client.post("/v1/events/batch", json=big, headers={"Idempotency-Key": "many-1"})
    assert first.status_code == 400 and len(first.content) > 200_000
    assert again.status_code == 400 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["rejected"] == 1000 and "results" not in again.json()  # a summary, not 273 KB
    assert accepted.status_code == 202
    store = redis.Redis.from_url(gateway.settings.redis_url)
    try:
        error_key = _record_key(gateway.settings, tenant, "/v1/events/batch", "junk-1")
        ok_key = _record_key(gateway.settings, tenant, "/v1/events/batch", "many-1")
        assert len(await store.hget(error_key, "body")) < 4096
        assert 0 < await store.ttl(error_key) <= 60  # a 4xx is kept briefly
        assert len(await store.hget(ok_key, "body")) <= 4096
        assert await store.ttl(ok_key) > 3600
    finally:
        await store.aclose()


async def test_a_tenant_past_its_budget_stores_no_more_answers(
    gateway_settings: Settings, api_key: tuple[str, str], adapter_env: dict[str, str]
) -> None:
    tenant, secret = api_key
    with start_gateway("gateway-budget", gateway_settings, **adapter_env,
                       TALLY_GATEWAY_IDEMPOTENCY_TENANT_BUDGET_BYTES="800") as gw:
        async with gw.client(secret) as client:
            for n in range(6):
                response = await client.post("/v1/events", json=event(id=f"budget-{n}"),
                                             headers={"Idempotency-Key": f"budget-{n}"})
                assert response.status_code == 202
    store = redis.Redis.from_url(gateway_settings.redis_url)
    try:
        kept = [await store.exists(_record_key(gateway_settings, tenant, "/v1/events", f"budget-{n}"))
                for n in range(6)]
    finally:
        await store.aclose()
    assert kept == [1, 1, 1, 0, 0, 0]  # about 240 bytes each against a budget of 800


async def test_an_answer_with_items_kafka_did_not_take_is_not_kept_under_its_key(settings: Settings) -> None:
    guard = RedisGuard.connect(settings.redis_url, 0.5, "open", Metrics())
    store = IdempotencyStore(guard, settings.redis_prefix, Metrics(), Retention(), 60)
    runs = []

    async def partly_failed() -> Answer:
        runs.append(1)
        return Answer(202, b'{"accepted":1,"failed":1}', "application/json", keep=False)

    key = uuid.uuid4().hex
    first = await store.run("t", "/v1/events/batch", key, b"fp", partly_failed)
    again = await store.run("t", "/v1/events/batch", key, b"fp", partly_failed)
    await guard.close()
    assert first.status == again.status == 202
    assert len(runs) == 2 and REPLAYED not in again.headers  # the retry ran for real


async def test_a_full_connection_pool_is_not_taken_for_redis_being_down(settings: Settings) -> None:
    pool = redis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=1, timeout=0.1, socket_timeout=5)
    guard = RedisGuard(redis.Redis(connection_pool=pool), "open", Metrics())
    blocker = asyncio.create_task(guard.call("test", guard.client.blpop([f"{settings.redis_prefix}never"], 1)))
    await asyncio.sleep(0.05)
    with pytest.raises(RedisDown):
        await guard.call("test", guard.client.ping())
    await blocker
    assert await guard.call("test", guard.client.ping())  # no pause: the breaker did not trip
    await guard.close()


@pytest.mark.parametrize("name", ["rate_limit_per_s", "webhook_rate_limit_per_s", "rate_limit_burst"])
def test_settings_that_would_switch_a_limit_off_stop_the_gateway(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GatewayConfig("k", "d", "r", Topics(), **{name: 0})


def test_a_webhook_limit_kafka_could_not_take_stops_the_gateway() -> None:
    with pytest.raises(ValueError, match="max_webhook_bytes"):
        GatewayConfig("k", "d", "r", Topics(), max_webhook_bytes=1024 * 1024)


def test_the_gateway_warns_when_its_redis_may_evict_its_state(gateway: Gateway) -> None:
    policy = redis_sync.Redis.from_url(gateway.settings.redis_url).config_get("maxmemory*")
    output = gateway.process.output()
    if int(policy["maxmemory"]) > 0 and policy["maxmemory-policy"] != "noeviction":
        assert f"Redis evicts keys (maxmemory-policy {policy['maxmemory-policy']})" in output
    else:
        assert "Redis evicts keys" not in output
