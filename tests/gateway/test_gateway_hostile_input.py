"""Hostile and odd input (review 2026-11): every one gets a 4xx problem on every route, never a 500,
never a 503 that retrying cannot cure, and never a 202 that loses or changes data."""

from __future__ import annotations

import json
import os
import time
import uuid

import orjson
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from tally.schemas.envelope import MAX_BYTES, MAX_NESTING
from tally.settings import Settings
from tests.gateway.helpers import (
    WEBHOOK_SECRETS,
    Gateway,
    event,
    for_tenant,
    github_headers,
    start_gateway,
    stripe_signature,
)


@pytest.fixture
def gateway(intake_gateway: Gateway) -> Gateway:
    """Every test here runs over both intake adapters, plain ASGI and Starlette (ADR 121)."""
    return intake_gateway


PROBLEM = "application/problem+json"


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def _event_bytes(**fields: object) -> bytes:
    return json.dumps(event(**fields)).encode()  # the standard library writes integers of any size


@pytest.mark.parametrize("levels", [MAX_NESTING + 1, 260, 1000])
async def test_deep_json_is_a_400_on_every_route_and_only_the_deep_item_of_a_batch(
    gateway: Gateway, api_key: tuple[str, str], levels: int
) -> None:
    _, secret = api_key
    body = f'{{"id":"deep-{levels}","source":"s","type":"t","data":{deep(levels)}}}'.encode()
    json = {"content-type": "application/json"}
    github = orjson.dumps({"id": f"gh-{uuid.uuid4().hex}"})[:-1] + f',"x":{deep(levels)}}}'.encode()
    async with gateway.client(secret) as client:
        hot = await client.post("/v1/events", content=body, headers=json)
        keyed = await client.post("/v1/events", content=body, headers={**json, "Idempotency-Key": uuid.uuid4().hex})
        batch = await client.post("/v1/events/batch", content=b"[" + body + b"," + _event_bytes() + b"]", headers=json)
        logs = await client.post("/v1/logs", content=f'{{"service":"s","message":"m","attributes":{{"a":{deep(levels)}}}}}'
                                 .encode(), headers=json)
        hook = await client.post("/v1/webhooks/github", content=github,
                                 headers=github_headers(github, WEBHOOK_SECRETS["github"][0], "d"))
        retry = await client.post("/v1/webhooks/github", content=github,
                                  headers=github_headers(github, WEBHOOK_SECRETS["github"][0], "d"))
    for response in (hot, keyed, logs, hook, retry):
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == PROBLEM
    assert batch.status_code == 202, batch.text
    assert [r["status"] for r in batch.json()["results"]] == ["rejected", "accepted"]
    assert "unhandled error" not in gateway.process.output()


async def test_a_non_ascii_stripe_signature_is_a_401(gateway: Gateway) -> None:
    body = orjson.dumps({"id": "evt_nonascii"})
    header = f"t={int(time.time())},v1=".encode() + b"\xe9"
    async with gateway.client() as client:
        response = await client.post("/v1/webhooks/stripe", content=body,
                                     headers=[(b"stripe-signature", header), (b"content-type", b"application/json")])
    assert response.status_code == 401, response.text
    assert "unhandled error" not in gateway.process.output()


@pytest.mark.parametrize(("fields", "field"), [
    ({"data": 123456789012345678901234567890}, "(body)"),
    ({"data": {"n": -99999999999999999999}}, "(body)"),
    ({"data_base64": "AAECAwQ=", "data": None}, "data_base64"),
    ({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}, "traceparent"),
    ({"tenant": "someone-else"}, "tenant"),
    ({"id": "a\u0000b"}, "(event)"),
    ({"data": {"text": "x\u0000y"}}, "(event)"),
    ({"source": "logs/api", "type": "tally.log"}, "source"),
    ({"source": "webhooks/stripe"}, "source"),
    ({"type": "tally.log"}, "type"),
    ({"id": "\U0001F600" * (MAX_BYTES["id"] // 4 + 1)}, "id"),
    ({"source": "\u00e9" * (MAX_BYTES["source"] // 2 + 1)}, "source"),
    ({"subject": "\u4e2d" * (MAX_BYTES["subject"] // 3 + 1)}, "subject"),
])
async def test_input_the_envelope_would_lose_or_change_is_refused_on_both_paths(
    gateway: Gateway, api_key: tuple[str, str], fields: dict[str, object], field: str
) -> None:
    _, secret = api_key
    body = _event_bytes(**fields)
    async with gateway.client(secret) as client:
        hot = await client.post("/v1/events", content=body, headers={"content-type": "application/json"})
        slow = await client.post("/v1/events", content=body, headers={"content-type": "application/json",
                                                                       "Idempotency-Key": uuid.uuid4().hex})
    for response in (hot, slow):
        assert response.status_code == 400, response.text
        assert field in [e["field"] for e in response.json()["errors"]], response.text


async def test_the_literal_text_backslash_u0000_and_exact_64_bit_integers_are_kept(
    gateway: Gateway, api_key: tuple[str, str]
) -> None:
    tenant, secret = api_key
    body = b'{"id":"lit-1","source":"s","type":"t","data":{"text":"a\\\\u0000b","big":18446744073709551615}}'
    async with gateway.client(secret) as client:
        response = await client.post("/v1/events", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 202, response.text
    [value] = [v for v in for_tenant(gateway.messages(), tenant) if v["id"] == "lit-1"]
    assert value["data"] == {"text": "a\\u0000b", "big": 18446744073709551615}


async def test_an_event_larger_than_kafka_takes_is_a_413_alone_and_a_rejected_item_in_a_batch(
    gateway: Gateway, api_key: tuple[str, str]
) -> None:
    tenant, secret = api_key
    big = event(id="big", data="x" * 1_100_000)
    async with gateway.client(secret) as client:
        batch = await client.post("/v1/events/batch", json=[event(id="small-1"), big, event(id="small-2")])
        logs = await client.post("/v1/logs", json=[{"service": "s", "message": "m", "attributes": {"x": "y" * 1_100_000}}])
    assert batch.status_code == 202, batch.text
    assert [r["status"] for r in batch.json()["results"]] == ["accepted", "rejected", "accepted"]
    assert batch.json()["results"][1]["problem"]["status"] == 413
    assert logs.status_code == 400 and logs.json()["results"][0]["problem"]["status"] == 413
    ids = sorted(v["id"] for v in for_tenant(gateway.messages(), tenant))
    assert ids == ["small-1", "small-2"]


async def test_a_webhook_at_the_size_limit_is_accepted(gateway: Gateway) -> None:
    limit = gateway.settings.gateway_max_webhook_bytes
    body = orjson.dumps({"id": f"evt_{uuid.uuid4().hex}", "pad": ""})
    body = body[:-2] + b"x" * (limit - len(body)) + b'"}'
    assert len(body) == limit
    async with gateway.client() as client:
        response = await client.post("/v1/webhooks/stripe", content=body, headers={
            "Stripe-Signature": stripe_signature(body, WEBHOOK_SECRETS["stripe"][-1]),
            "content-type": "application/json"})
    assert response.status_code == 202, response.text


async def test_an_ndjson_body_with_too_many_lines_is_refused_before_it_is_parsed(
    gateway: Gateway, api_key: tuple[str, str]
) -> None:
    _, secret = api_key
    lines = b"\n".join([b"{}"] * (gateway.settings.gateway_max_batch_items + 1) + [b"not json"])
    async with gateway.client(secret) as client:
        response = await client.post("/v1/logs", content=lines, headers={"content-type": "application/x-ndjson"})
    assert response.status_code == 413, response.text


async def test_a_repeated_ce_header_is_refused(gateway: Gateway, api_key: tuple[str, str]) -> None:
    _, secret = api_key
    headers = [("ce-specversion", "1.0"), ("ce-id", "A"), ("ce-id", "B"), ("ce-source", "s"), ("ce-type", "t"),
               ("content-type", "application/json"), ("idempotency-key", uuid.uuid4().hex)]
    async with gateway.client(secret) as client:
        response = await client.post("/v1/events", content=b"{}", headers=headers)
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "ce-id"


@pytest.mark.parametrize("key", ['"abc', 'abc"', '"a b"', ""])
async def test_an_idempotency_key_with_unbalanced_quotes_is_refused(
    gateway: Gateway, api_key: tuple[str, str], key: str
) -> None:
    _, secret = api_key
    async with gateway.client(secret) as client:
        response = await client.post("/v1/events", json=event(), headers={"Idempotency-Key": key})
    assert response.status_code == 400, response.text


def _rejected(metrics: str, route: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("tally_gateway_events_rejected_total") and f'route="{route}"' in line)


async def test_a_batch_without_a_valid_item_counts_each_item_once(gateway: Gateway, api_key: tuple[str, str]) -> None:
    _, secret = api_key
    async with gateway.client(secret) as client:
        before = _rejected((await client.get("/metrics")).text, "/v1/events/batch")
        response = await client.post("/v1/events/batch", json=[{"id": "x"}, 3])
        after = _rejected((await client.get("/metrics")).text, "/v1/events/batch")
    assert response.status_code == 400
    assert after - before == 2


async def test_an_event_the_topic_refuses_for_good_is_a_413_not_a_503(
    gateway_settings: Settings, api_key: tuple[str, str], adapter_env: dict[str, str]
) -> None:
    _, secret = api_key
    own = gateway_settings.model_copy(update={"topic_prefix": f"small{uuid.uuid4().hex[:6]}."})
    admin = AdminClient({"bootstrap.servers": own.kafka_bootstrap})
    topic = NewTopic(own.topics.events, num_partitions=1, replication_factor=1, config={"max.message.bytes": "20000"})
    admin.create_topics([topic])[own.topics.events].result(30)
    try:
        with start_gateway("gateway-small-topic", own, **adapter_env) as gw:
            async with gw.client(secret) as client:
                response = await client.post("/v1/events", json=event(data=os.urandom(40_000).hex()))
        assert response.status_code == 413, response.text
    finally:
        admin.delete_topics([own.topics.events])[own.topics.events].result(30)


@pytest.mark.parametrize(("record", "field"), [
    ({"service": "\u00e9" * 65}, "service"),
    ({"service": "s", "id": "\U0001F600" * 65}, "id"),
])
async def test_log_fields_that_become_keys_are_bounded_in_bytes(
    gateway: Gateway, api_key: tuple[str, str], record: dict[str, str], field: str
) -> None:
    _, secret = api_key
    async with gateway.client(secret) as client:
        response = await client.post("/v1/logs", json={"message": "m", **record})
    assert response.status_code == 400, response.text
    assert response.json()["results"][0]["problem"]["errors"][0]["field"] == field
