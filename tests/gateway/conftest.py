"""Gateway fixtures: a real `tally gateway` subprocess on its own topics, webhook sources and API keys."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tally.ingest.auth import create_key
from tally.settings import Settings
from tally.topics import create_topics
from tests.gateway.helpers import WEBHOOK_SECRETS, Gateway, start_gateway


def _own_topics(settings: Settings) -> Settings:
    own = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}gw{uuid.uuid4().hex[:6]}."})
    create_topics(own)
    return own


@pytest.fixture(scope="session")
def webhooks_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gateway") / "webhooks.yaml"
    stripe_old, stripe_new = WEBHOOK_SECRETS["stripe"]
    path.write_text(f"""
sources:
  stripe:
    scheme: stripe
    tenant: wh-tenant
    secrets: ["{stripe_old}", "{stripe_new}"]
  standard:
    scheme: standard
    tenant: wh-tenant
    secrets: ["{WEBHOOK_SECRETS['standard'][0]}"]
  github:
    scheme: hmac
    tenant: wh-tenant
    secrets: ["{WEBHOOK_SECRETS['github'][0]}"]
  mercadopago:
    scheme: mercadopago
    tenant: wh-tenant
    secrets: ["{WEBHOOK_SECRETS['mercadopago'][0]}"]
    type: payment.notification
  slack:
    scheme: hmac
    tenant: wh-tenant
    secrets: ["{WEBHOOK_SECRETS['slack'][0]}"]
    header: X-Slack-Signature
    prefix: "v0="
    timestamp_header: X-Slack-Request-Timestamp
    signed: "v0:{{timestamp}}:{{body}}"
""")
    return path


@pytest.fixture(scope="session")
def gateway_settings(settings: Settings, webhooks_file: Path) -> Settings:
    return _own_topics(settings).model_copy(update={"gateway_webhooks_file": str(webhooks_file)})


@pytest.fixture(scope="session")
def asgi_gateway(gateway_settings: Settings) -> Iterator[Gateway]:
    """One gateway shared by the tests that do not need special settings (plain-ASGI front on, the default)."""
    with start_gateway("gateway", gateway_settings) as gw:
        yield gw


@pytest.fixture(scope="session")
def gateway(asgi_gateway: Gateway) -> Gateway:
    return asgi_gateway


ADAPTERS = {"asgi": "true", "starlette": "false"}  # TALLY_GATEWAY_FAST_INTAKE of each intake adapter


@pytest.fixture(scope="session")
def starlette_gateway(gateway_settings: Settings) -> Iterator[Gateway]:
    """The shared gateway with its plain-ASGI front off: every request goes through the Starlette routes."""
    with start_gateway("gateway-starlette", gateway_settings, TALLY_GATEWAY_FAST_INTAKE="false") as gw:
        yield gw


@pytest.fixture(scope="session", params=list(ADAPTERS))
def adapter(request: pytest.FixtureRequest) -> str:
    """The intake adapter a test of the intake modules runs over; each runs over both (ADR 121)."""
    return request.param


@pytest.fixture
def adapter_env(adapter: str) -> dict[str, str]:
    """The environment that starts a gateway of its own with `adapter` serving the write routes."""
    return {"TALLY_GATEWAY_FAST_INTAKE": ADAPTERS[adapter]}


@pytest.fixture
def intake_gateway(adapter: str, request: pytest.FixtureRequest) -> Gateway:
    """The shared gateway whose write routes `adapter` serves."""
    return request.getfixturevalue(f"{adapter}_gateway")


@pytest.fixture
def fresh_topics(gateway_settings: Settings) -> Settings:
    return _own_topics(gateway_settings)


async def _new_key(settings: Settings, scopes: list[str]) -> tuple[str, str]:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(settings.database_url)
    try:
        _, secret = await create_key(conn, tenant, "gateway-test", scopes)
    finally:
        await conn.close()
    return tenant, secret


@pytest.fixture
async def api_key(settings: Settings) -> tuple[str, str]:
    """(tenant, secret) of a new key with the default scopes."""
    return await _new_key(settings, ["events:write", "logs:write"])


@pytest.fixture
def new_key(settings: Settings):  # noqa: ANN201 - a factory
    async def make(scopes: list[str]) -> tuple[str, str]:
        return await _new_key(settings, scopes)

    return make

