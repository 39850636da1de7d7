"""What Redis backs: Idempotency-Key, rate limits, and the fail-open (or closed) policy when Redis is gone."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from tally.settings import Settings
from tests.gateway.helpers import Gateway, event, for_tenant, start_gateway
from tests.support import free_port, wait_until


@pytest.fixture
def gateway(intake_gateway: Gateway) -> Gateway:
    """Every test here runs over both intake adapters, plain ASGI and Starlette (ADR 121)."""
    return intake_gateway


async def test_a_repeated_idempotency_key_replays_the_first_response(gateway: Gateway, api_key: tuple[str, str]) -> None:
    tenant, secret = api_key
    body = event(id="idem-1")
    async with gateway.client(secret) as client:
        first = await client.post("/v1/events", json=body, headers={"Idempotency-Key": '"order-1"'})
        again = await client.post("/v1/events", json=body, headers={"Idempotency-Key": '"order-1"'})
        other_route = await client.post("/v1/events/batch", json=[body], headers={"Idempotency-Key": '"order-1"'})
        changed = await client.post("/v1/events", json=event(id="idem-2"), headers={"Idempotency-Key": '"order-1"'})
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert other_route.status_code == 202 and "idempotent-replayed" not in other_route.headers  # scoped to the route
    assert changed.status_code == 422
    assert changed.headers["content-type"] == "application/problem+json"
    assert changed.json()["errors"][0]["field"] == "Idempotency-Key"
    ids = [v["id"] for v in for_tenant(gateway.messages(), tenant)]
    assert sorted(ids) == ["idem-1", "idem-1"]  # once by /v1/events, once by the batch route; never a third


async def test_keys_are_scoped_to_the_tenant(gateway: Gateway, new_key) -> None:  # noqa: ANN001
    _, first = await new_key(["events:write"])
    _, second = await new_key(["events:write"])
    async with gateway.client(first) as a, gateway.client(second) as b:
        one = await a.post("/v1/events", json=event(id="t-1"), headers={"Idempotency-Key": "shared"})
        two = await b.post("/v1/events", json=event(id="t-2"), headers={"Idempotency-Key": "shared"})
    assert one.status_code == two.status_code == 202
    assert "idempotent-replayed" not in two.headers


def _queue_depth(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return float(re.search(r"^tally_gateway_producer_queue_depth (\S+)$", text, re.M)[1])


async def test_a_repeat_while_the_first_is_in_flight_gets_409(
    gateway_settings: Settings, api_key: tuple[str, str], adapter_env: dict[str, str]
) -> None:
    tenant, secret = api_key
    body = event(id="inflight")
    key = {"Idempotency-Key": "slow"}
    # The producer holds each message for 3 s before sending it: the first request waits that long for its ack.
    with start_gateway("gateway-inflight", gateway_settings, **adapter_env,
                       TALLY_GATEWAY_LINGER_MS="3000") as gateway:
        async with gateway.client(secret) as client:
            first = asyncio.create_task(client.post("/v1/events", json=body, headers=key))
            await asyncio.to_thread(wait_until, lambda: _queue_depth(gateway.url) == 1, 10, 0.02,
                                    "the first request to wait for its ack")
            second = await client.post("/v1/events", json=body, headers=key)
            answered_while_first_waited = not first.done()
            first = await first
            third = await client.post("/v1/events", json=body, headers=key)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    assert second.status_code == 409, second.text
    assert answered_while_first_waited
    assert second.headers["retry-after"] == "1"
    assert second.headers["content-type"] == "application/problem+json"
    assert third.status_code == 202 and third.headers["idempotent-replayed"] == "true"
    assert third.content == first.content
    assert [v["id"] for v in for_tenant(gateway.messages(), tenant)] == ["inflight"]


async def test_concurrent_repeats_publish_once(gateway: Gateway, api_key: tuple[str, str]) -> None:
    tenant, secret = api_key
    async with gateway.client(secret) as client:
        responses = await asyncio.gather(*[
            client.post("/v1/events", json=event(id="race"), headers={"Idempotency-Key": "race"}) for _ in range(20)
        ])
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {202, 409} and 202 in statuses
    assert [v["id"] for v in for_tenant(gateway.messages(), tenant)] == ["race"]


async def test_rate_limit_answers_429_with_retry_after_and_ratelimit_headers(
    gateway_settings: Settings, api_key: tuple[str, str], adapter_env: dict[str, str]
) -> None:
    _, secret = api_key
    env = {"TALLY_GATEWAY_RATE_LIMIT_BURST": "3", "TALLY_GATEWAY_RATE_LIMIT_PER_S": "0.5"}
    with start_gateway("gateway-ratelimit", gateway_settings, **adapter_env, **env) as gateway:
        async with gateway.client(secret) as client:
            responses = [await client.post("/v1/events", json=event()) for _ in range(4)]
            other_route = await client.post("/v1/logs", json={"service": "s", "message": "m"})
            metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in responses] == [202, 202, 202, 429]
    assert responses[0].headers["ratelimit-policy"] == '"events";q=3;w=6'
    assert responses[0].headers["ratelimit"].startswith('"events";r=2;t=')
    limited = responses[3]
    assert limited.headers["content-type"] == "application/problem+json"
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["ratelimit"].startswith('"events";r=0;')
    assert other_route.status_code == 202  # buckets are per key and route
    assert 'tally_gateway_rate_limited_total{route="/v1/events"} 1.0' in metrics


async def test_with_redis_unreachable_the_open_policy_lets_events_through(
    gateway_settings: Settings, api_key: tuple[str, str], adapter_env: dict[str, str]
) -> None:
    tenant, secret = api_key
    dead = gateway_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with start_gateway("gateway-redis-open", dead, **adapter_env) as gateway:
        async with gateway.client(secret) as client:
            plain = await client.post("/v1/events", json=event(id="open-1"))
            keyed = await client.post("/v1/events", json=event(id="open-2"), headers={"Idempotency-Key": "k"})
            ready = await client.get("/readyz")
            metrics = (await client.get("/metrics")).text
        output = gateway.process.output()
    assert plain.status_code == 202, plain.text
    assert keyed.status_code == 202, keyed.text
    assert ready.status_code == 200 and ready.json()["redis"] == "down (policy open)"
    assert 'tally_gateway_redis_failures_total{operation="rate_limit"}' in metrics
    assert "redis unavailable during rate_limit (policy open)" in output
    assert "Traceback" not in output
    assert {"open-1", "open-2"} <= {v["id"] for v in for_tenant(gateway.messages(), tenant)}


async def test_with_redis_unreachable_the_closed_policy_answers_503(
    gateway_settings: Settings, api_key: tuple[str, str], adapter_env: dict[str, str]
) -> None:
    _, secret = api_key
    dead = gateway_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with start_gateway("gateway-redis-closed", dead, **adapter_env,
                       TALLY_GATEWAY_REDIS_FAILURE_POLICY="closed") as gateway:
        async with gateway.client(secret) as client:
            refused = await client.post("/v1/events", json=event())
            ready = await client.get("/readyz")
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    assert refused.headers["content-type"] == "application/problem+json"
    assert ready.status_code == 503
