"""Signed webhooks: each scheme accepts a valid signature and refuses a wrong one, a stale one and a replay."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable

import orjson
import pytest

from tests.gateway.helpers import (
    WEBHOOK_SECRETS,
    Gateway,
    for_tenant,
    github_headers,
    slack_headers,
    standard_headers,
    stripe_signature,
)

STALE = int(time.time()) - 3600
WRONG = {"standard": "whsec_" + base64.b64encode(b"some-other-secret-of-32-bytes!!!").decode()}


def _stripe(body: bytes, secret: str, stale: bool = False) -> dict[str, str]:
    return {"Stripe-Signature": stripe_signature(body, secret, STALE if stale else None),
            "content-type": "application/json"}


def _standard(body: bytes, secret: str, stale: bool = False) -> dict[str, str]:
    return standard_headers(body, secret, "msg_" + orjson.loads(body)["id"], STALE if stale else None)


def _github(body: bytes, secret: str, stale: bool = False) -> dict[str, str]:
    return github_headers(body, secret, orjson.loads(body)["id"])


def _slack(body: bytes, secret: str, stale: bool = False) -> dict[str, str]:
    return slack_headers(body, secret, STALE if stale else None)


SCHEMES: dict[str, Callable[..., dict[str, str]]] = {
    "stripe": _stripe, "standard": _standard, "github": _github, "slack": _slack,
}


def _payload(source: str) -> bytes:
    event_id = f"evt_{uuid.uuid4().hex[:12]}"
    if source == "slack":
        return f"token=x&id={event_id}".encode()
    return orjson.dumps({"id": event_id, "type": "invoice.paid", "data": {"amount": 42}, "tenant": "not-this-one"})


def _headers(source: str, body: bytes, secret: str, stale: bool = False) -> dict[str, str]:
    if source == "slack":
        return _slack(body, secret, stale)
    return SCHEMES[source](body, secret, stale)


@pytest.mark.parametrize("source", sorted(SCHEMES))
async def test_a_valid_signature_is_accepted_and_published_under_the_sources_tenant(
    gateway: Gateway, source: str
) -> None:
    body = _payload(source)
    async with gateway.client() as client:
        response = await client.post(f"/v1/webhooks/{source}", content=body,
                                     headers=_headers(source, body, WEBHOOK_SECRETS[source][-1]))
    assert response.status_code == 202, response.text
    assert "ratelimit" in response.headers
    event_id = response.json()["id"]
    [value] = [v for v in for_tenant(gateway.messages(), "wh-tenant") if v["id"] == event_id]
    assert value["source"] == f"webhooks/{source}"
    if source in ("stripe", "github"):
        assert event_id == orjson.loads(body)["id"]  # the provider's id: its retries deduplicate
    if source == "standard":
        assert event_id == "msg_" + orjson.loads(body)["id"]
    if source != "slack":  # the type comes from the signed body, never from X-GitHub-Event
        assert value["type"] == "invoice.paid" and value["data"]["data"] == {"amount": 42}


@pytest.mark.parametrize("source", sorted(SCHEMES))
async def test_wrong_stale_and_replayed_signatures_are_refused(gateway: Gateway, source: str) -> None:
    body = _payload(source)
    secret = WEBHOOK_SECRETS[source][-1]
    async with gateway.client() as client:
        wrong = await client.post(f"/v1/webhooks/{source}", content=body,
                                  headers=_headers(source, body, WRONG.get(source, "not-the-secret")))
        tampered = await client.post(f"/v1/webhooks/{source}", content=body + b" ",
                                     headers=_headers(source, body, secret))
        missing = await client.post(f"/v1/webhooks/{source}", content=body, headers={"content-type": "application/json"})
        headers = _headers(source, body, secret)
        first = await client.post(f"/v1/webhooks/{source}", content=body, headers=headers)
        replay = await client.post(f"/v1/webhooks/{source}", content=body, headers=headers)
        stale = None
        if source != "github":  # GitHub signs no timestamp: replays are caught by the memory alone
            stale = await client.post(f"/v1/webhooks/{source}", content=body, headers=_headers(source, body, secret, True))
    for response in (wrong, tampered, missing):
        assert response.status_code == 401, response.text
        assert response.headers["content-type"] == "application/problem+json"
    assert missing.json()["reason"] == "missing"
    assert first.status_code == 202
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]  # an accepted message again
    assert replay.headers["idempotent-replayed"] == "true"
    if stale is not None:
        assert stale.status_code == 401 and stale.json()["reason"] == "stale"


async def test_stripe_accepts_any_of_several_signatures_and_secrets_during_rotation(gateway: Gateway) -> None:
    old, new = WEBHOOK_SECRETS["stripe"]
    body = _payload("stripe")
    t = int(time.time())
    both = stripe_signature(body, "whsec_unknown", t) + "," + stripe_signature(body, old, t).split(",")[1]
    async with gateway.client() as client:
        several = await client.post("/v1/webhooks/stripe", content=body,
                                    headers={"Stripe-Signature": both, "content-type": "application/json"})
        newer = _payload("stripe")
        by_new = await client.post("/v1/webhooks/stripe", content=newer, headers=_stripe(newer, new))
    assert several.status_code == 202, several.text
    assert by_new.status_code == 202, by_new.text


async def test_unknown_source_and_malformed_headers(gateway: Gateway) -> None:
    body = _payload("stripe")
    async with gateway.client() as client:
        unknown = await client.post("/v1/webhooks/nobody", content=body)
        garbage = await client.post("/v1/webhooks/stripe", content=body, headers={"Stripe-Signature": "t=x,v1=="})
        standard = await client.post("/v1/webhooks/standard", content=body, headers={
            "webhook-id": "a", "webhook-timestamp": str(int(time.time())), "webhook-signature": "v1"})
        binary = await client.post("/v1/webhooks/stripe", content=b"\xff\xfe", headers=_stripe(b"\xff\xfe", "whsec_current_secret"))
    assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/problem+json"
    assert garbage.status_code == 401
    assert standard.status_code == 401
    assert binary.status_code in (400, 401)
