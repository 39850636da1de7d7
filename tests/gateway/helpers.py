"""Helpers for gateway tests: start a gateway, sign webhooks, read events back from Kafka."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from tally.settings import Settings
from tests.support import TallyProcess, free_port, read_topic, running, wait_until

WEBHOOK_SECRETS = {
    "stripe": ["whsec_old_secret_for_rotation", "whsec_current_secret"],
    "standard": ["whsec_" + base64.b64encode(b"standard-webhooks-test-secret-32b").decode()],
    "github": ["github-hook-secret"],
    "slack": ["slack-signing-secret"],
    "mercadopago": ["mercadopago-secret-key"],
}


@dataclass
class Gateway:
    url: str
    settings: Settings
    process: TallyProcess

    def client(self, secret: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def messages(self) -> list[Any]:
        return read_topic(self.settings.kafka_bootstrap, self.settings.topics.events)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def start_gateway(name: str, settings: Settings, **env: str) -> Iterator[Gateway]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(name, ["gateway", "--port", str(port)], settings, **env) as process:
        try:
            wait_until(lambda: healthy(url) or not process.alive(), 30, 0.1, "the gateway")
        except AssertionError:
            raise AssertionError(f"gateway did not start:\n{process.output()}") from None
        assert process.alive(), f"gateway exited:\n{process.output()}"
        yield Gateway(url, settings, process)


def event(**fields: Any) -> dict[str, Any]:
    base = {"specversion": "1.0", "id": f"evt-{time.monotonic_ns()}", "source": "tests", "type": "test.happened",
            "subject": "customer-1", "data": {"n": 1}}
    base.update(fields)
    return base


def for_tenant(messages: list[Any], tenant: str) -> list[dict[str, Any]]:
    return [orjson.loads(m.value()) for m in messages if orjson.loads(m.value()).get("tenant") == tenant]


def stripe_signature(body: bytes, secret: str, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    sig = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={sig}"


def standard_headers(body: bytes, secret: str, msg_id: str, timestamp: int | None = None) -> dict[str, str]:
    t = int(time.time()) if timestamp is None else timestamp
    key = base64.b64decode(secret.removeprefix("whsec_"))
    sig = base64.b64encode(hmac.new(key, f"{msg_id}.{t}.".encode() + body, hashlib.sha256).digest()).decode()
    return {"webhook-id": msg_id, "webhook-timestamp": str(t), "webhook-signature": f"v1,{sig}",
            "content-type": "application/json"}


def github_headers(body: bytes, secret: str, delivery: str) -> dict[str, str]:
    sig = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={sig}", "X-GitHub-Delivery": delivery, "X-GitHub-Event": "push",
            "content-type": "application/json"}


def slack_headers(body: bytes, secret: str, timestamp: int | None = None) -> dict[str, str]:
    t = int(time.time()) if timestamp is None else timestamp
    sig = hmac.new(secret.encode(), f"v0:{t}:".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Signature": f"v0={sig}", "X-Slack-Request-Timestamp": str(t),
            "content-type": "application/x-www-form-urlencoded"}


def mercadopago_headers(data_id: str, request_id: str, secret: str, ts: str | None = None) -> dict[str, str]:
    """As MercadoPago documents it: HMAC-SHA256 (hex) of `id:<data.id>;request-id:<x-request-id>;ts:<ts>;`,
    with an alphanumeric data.id in lower case."""
    t = str(int(time.time())) if ts is None else ts
    manifest = f"id:{data_id.lower()};request-id:{request_id};ts:{t};"
    sig = hmac.new(secret.encode(), manifest.encode(), hashlib.sha256).hexdigest()
    return {"x-signature": f"ts={t},v1={sig}", "x-request-id": request_id, "content-type": "application/json"}
