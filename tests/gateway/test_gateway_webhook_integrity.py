"""Webhook integrity (review 2026-11): only what is signed names an event, respelled timestamps are
still replays, a source whose timestamp is not signed cannot start, and MercadoPago as documented."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest

from tally.ingest.signatures import mercadopago_manifest
from tally.ingest.webhooks import WebhookConfigError, load_sources
from tally.settings import Settings
from tests.gateway.helpers import (
    WEBHOOK_SECRETS,
    Gateway,
    for_tenant,
    github_headers,
    mercadopago_headers,
    standard_headers,
    start_gateway,
    stripe_signature,
)


async def test_an_unsigned_delivery_id_or_event_type_never_names_the_event(gateway: Gateway) -> None:
    body = orjson.dumps({"action": "opened", "number": uuid.uuid4().hex})  # GitHub bodies carry no id
    secret = WEBHOOK_SECRETS["github"][0]
    async with gateway.client() as client:
        first = await client.post("/v1/webhooks/github", content=body, headers=github_headers(body, secret, "d-1"))
        forged = {**github_headers(body, secret, "d-FORGED"), "X-GitHub-Event": "billing.charge"}
        replay = await client.post("/v1/webhooks/github", content=body, headers=forged)
    assert first.status_code == 202, first.text
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    [value] = [v for v in for_tenant(gateway.messages(), "wh-tenant") if v["id"] == first.json()["id"]]
    assert value["type"] == "webhook" and value["id"] not in ("d-1", "d-FORGED")


@pytest.mark.parametrize("spelling", ["0{t}", "+{t}", "{t}.5", "{t}.0"])
async def test_a_respelled_timestamp_is_still_a_replay(gateway: Gateway, spelling: str) -> None:
    t = int(time.time())
    stripe_body = orjson.dumps({"id": f"evt_{uuid.uuid4().hex}", "type": "invoice.paid"})
    stripe_secret = WEBHOOK_SECRETS["stripe"][-1]
    respelled = stripe_signature(stripe_body, stripe_secret, t).replace(f"t={t}", "t=" + spelling.format(t=t))
    standard_body = orjson.dumps({"id": uuid.uuid4().hex})
    standard = standard_headers(standard_body, WEBHOOK_SECRETS["standard"][0], f"msg_{uuid.uuid4().hex}", t)
    async with gateway.client() as client:
        stripe_first = await client.post("/v1/webhooks/stripe", content=stripe_body, headers={
            "Stripe-Signature": stripe_signature(stripe_body, stripe_secret, t), "content-type": "application/json"})
        stripe_again = await client.post("/v1/webhooks/stripe", content=stripe_body, headers={
            "Stripe-Signature": respelled, "content-type": "application/json"})
        standard_first = await client.post("/v1/webhooks/standard", content=standard_body, headers=standard)
        standard_again = await client.post("/v1/webhooks/standard", content=standard_body, headers={
            **standard, "webhook-timestamp": spelling.format(t=t)})
    assert stripe_first.status_code == standard_first.status_code == 202
    for again in (stripe_again, standard_again):
        assert again.status_code in (200, 401), again.text  # a replay, or a spelling the library refuses
        assert again.status_code != 202


def _sources(tmp_path: Path, spec: str) -> dict:
    path = tmp_path / "webhooks.yaml"
    path.write_text("sources:\n  s:\n    tenant: t\n    secrets: [x]\n" + spec)
    return load_sources(path)


@pytest.mark.parametrize(("spec", "message"), [
    ("    scheme: hmac\n    timestamp_header: X-Timestamp\n", "does not hold {timestamp}"),
    ("    scheme: hmac\n    id_header: X-GitHub-Delivery\n", "unsigned header"),
    ("    scheme: hmac\n    type_header: X-GitHub-Event\n", "unsigned header"),
    ("    scheme: hmac\n    tenant: " + "\u00e9" * 65 + "\n", "longer than 128 bytes"),
    ("    scheme: hmac\n    type: tally.log\n", "tally.log is reserved for /v1/logs; set `type` to another"),
])
def test_a_source_that_would_trust_unsigned_values_stops_the_gateway(tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(WebhookConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        _sources(tmp_path, spec)


def test_mercadopago_is_a_scheme() -> None:
    assert mercadopago_manifest("ABC123", "req-1", "1700000000") == "id:abc123;request-id:req-1;ts:1700000000;"
    assert mercadopago_manifest("a-B_1", "req-1", "1") == "id:a-B_1;request-id:req-1;ts:1;"  # not alphanumeric
    assert mercadopago_manifest(None, None, "1") == "ts:1;"  # parts missing from the request are left out


@pytest.mark.parametrize("source", ["github", "standard"])
async def test_a_signed_body_of_the_log_type_is_refused_as_the_events_route_refuses_it(
    gateway: Gateway, source: str
) -> None:
    """Log records come only through the logs routes, which hold their own rules (service, level, message)."""
    event_id = f"evt_{uuid.uuid4().hex}"
    body = orjson.dumps({"id": event_id, "type": "tally.log", "data": {"service": "x", "level": "error"}})
    secret = WEBHOOK_SECRETS[source][0]
    headers = (github_headers(body, secret, "d") if source == "github"
               else standard_headers(body, secret, f"msg_{event_id}"))
    async with gateway.client() as client:
        response = await client.post(f"/v1/webhooks/{source}", content=body, headers=headers)
    published = [v for v in for_tenant(gateway.messages(), "wh-tenant") if v["type"] == "tally.log"]
    assert published == [], response.text
    assert response.status_code == 400 and response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"] == [{"field": "type", "message": "tally.log is reserved for /v1/logs"}]


async def test_a_mercadopago_notification_signed_as_documented_is_accepted(gateway: Gateway) -> None:
    secret = WEBHOOK_SECRETS["mercadopago"][0]
    data_id = f"PAY{uuid.uuid4().hex[:10].upper()}"
    request_id = str(uuid.uuid4())
    body = orjson.dumps({"action": "payment.updated", "type": "forged.type", "data": {"id": data_id}})
    headers = mercadopago_headers(data_id, request_id, secret)
    millis = mercadopago_headers(data_id, str(uuid.uuid4()), secret, str(int(time.time() * 1000)))
    async with gateway.client() as client:
        accepted = await client.post(f"/v1/webhooks/mercadopago?data.id={data_id}&type=payment", content=body,
                                     headers=headers)
        again = await client.post(f"/v1/webhooks/mercadopago?data.id={data_id}&type=payment",
                                  content=body + b" ", headers=headers)  # the body is not signed: still a replay
        in_millis = await client.post(f"/v1/webhooks/mercadopago?data.id={data_id}", content=body, headers=millis)
        other_id = await client.post("/v1/webhooks/mercadopago?data.id=999", content=body, headers=headers)
        missing = await client.post(f"/v1/webhooks/mercadopago?data.id={data_id}", content=body)
    assert accepted.status_code == 202, accepted.text
    assert again.status_code == 200 and again.json()["id"] == accepted.json()["id"]
    assert in_millis.status_code == 202, in_millis.text
    assert other_id.status_code == 401 and missing.status_code == 401
    [value] = [v for v in for_tenant(gateway.messages(), "wh-tenant") if v["id"] == accepted.json()["id"]]
    assert value["id"] == f"{data_id}.{request_id}"
    assert value["type"] == "payment.notification"  # from the source's settings: MercadoPago signs no body


async def test_webhook_buckets_are_per_source(gateway_settings: Settings) -> None:
    with start_gateway("gateway-webhook-buckets", gateway_settings, TALLY_GATEWAY_WEBHOOK_RATE_LIMIT_BURST="3",
                       TALLY_GATEWAY_WEBHOOK_RATE_LIMIT_PER_S="0.1") as gw:
        async with gw.client() as client:
            junk = [(await client.post("/v1/webhooks/stripe", content=b"{}")).status_code for _ in range(5)]
            body = orjson.dumps({"id": f"gh-{uuid.uuid4().hex}"})
            github = await client.post("/v1/webhooks/github", content=body,
                                       headers=github_headers(body, WEBHOOK_SECRETS["github"][0], "d"))
    assert junk == [401, 401, 401, 429, 429]
    assert github.status_code == 202, github.text  # junk at one source does not starve another


async def test_a_body_that_never_arrives_whole_gets_408(gateway_settings: Settings, api_key: tuple[str, str]) -> None:
    _, secret = api_key
    with start_gateway("gateway-slow-body", gateway_settings, TALLY_GATEWAY_BODY_TIMEOUT_S="1") as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        answers = []
        for path, auth in (("/v1/events", secret), ("/v1/logs", secret), ("/v1/webhooks/stripe", None)):
            reader, writer = await asyncio.open_connection(host, int(port))
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
            if auth:
                head += f"Authorization: Bearer {auth}\r\n"
            writer.write(head.encode() + b"\r\n{")
            await writer.drain()
            answers.append(await asyncio.wait_for(reader.readline(), 10))
            writer.close()
    assert all(line.startswith(b"HTTP/1.1 408") for line in answers), answers


async def test_a_webhook_the_processor_would_dead_letter_is_a_400(gateway: Gateway) -> None:
    secret = WEBHOOK_SECRETS["github"][0]
    nul = orjson.dumps({"id": f"gh-{uuid.uuid4().hex}", "text": "a\u0000b"})
    long_type = orjson.dumps({"id": f"gh-{uuid.uuid4().hex}"})
    async with gateway.client() as client:
        with_nul = await client.post("/v1/webhooks/github", content=nul, headers=github_headers(nul, secret, "d"))
        media = await client.post("/v1/webhooks/github", content=long_type, headers={
            **github_headers(long_type, secret, "d"), "content-type": "application/" + "x" * 200 + "+json"})
    assert with_nul.status_code == 400, with_nul.text
    assert media.status_code == 400 and media.json()["errors"][0]["field"] == "datacontenttype"


def test_a_tenant_longer_than_the_envelope_takes_gets_no_key() -> None:
    run = subprocess.run([sys.executable, "-m", "tally.cli", "keys", "create", "--tenant", "\u00e9" * 65,
                          "--name", "n"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "128 bytes" in run.stderr
