"""End to end through every layer: HTTP -> Kafka -> processor -> PostgreSQL, exactly once across a restart."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import pytest

from ingest.auth import create_key
from tally.settings import Settings
from tests.support import free_port, running, wait_until


@pytest.fixture
async def api_key(db: asyncpg.Connection) -> tuple[str, str]:
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    _, secret = await create_key(db, tenant, "test", ["events:write"])
    return tenant, secret


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def _persisted(db: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    return await db.fetch("select source, id, type, subject from events where tenant = $1 order by id", tenant)


async def _wait_rows(db: asyncpg.Connection, tenant: str, n: int, timeout_s: float = 30) -> list[asyncpg.Record]:
    for _ in range(int(timeout_s * 10)):
        rows = await _persisted(db, tenant)
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {n} rows for {tenant}, found {len(await _persisted(db, tenant))}")


async def test_event_is_persisted_exactly_once_across_a_processor_restart(
    isolated: Settings, db: asyncpg.Connection, api_key: tuple[str, str]
) -> None:
    tenant, secret = api_key
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    event = {"specversion": "1.0", "id": "evt-1", "source": "checkout", "type": "order.placed",
             "subject": "customer-7", "data": {"amount": 42}}
    headers = {"Authorization": f"Bearer {secret}"}

    with running("gateway", ["gateway", "--port", str(port)], isolated) as gateway:
        await asyncio.to_thread(wait_until, lambda: _healthy(url), 30, 0.1, "the gateway")
        async with httpx.AsyncClient(base_url=url, headers=headers) as client:
            assert (await client.post("/v1/events", json=event)).status_code == 202

            with running("processor", ["process"], isolated) as processor:
                rows = await _wait_rows(db, tenant, 1)
                processor.kill9()

            # The producer retries after a timeout: the same event arrives again, and the
            # restarted processor re-reads whatever the killed one had not committed.
            assert (await client.post("/v1/events", json=event)).status_code == 202
            with running("processor", ["process"], isolated):
                marker = {**event, "id": "evt-2"}
                assert (await client.post("/v1/events", json=marker)).status_code == 202
                rows = await _wait_rows(db, tenant, 2)
        assert gateway.alive()

    assert [(r["source"], r["id"], r["type"], r["subject"]) for r in rows] == [
        ("checkout", "evt-1", "order.placed", "customer-7"),
        ("checkout", "evt-2", "order.placed", "customer-7"),
    ]
    assert await db.fetchval("select count(*) from event_keys where tenant = $1", tenant) == 2


async def test_gateway_refuses_a_request_without_a_valid_key(isolated: Settings) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running("gateway", ["gateway", "--port", str(port)], isolated):
        await asyncio.to_thread(wait_until, lambda: _healthy(url), 30, 0.1, "the gateway")
        async with httpx.AsyncClient(base_url=url) as client:
            missing = await client.post("/v1/events", json={"id": "x", "source": "s", "type": "t"})
            wrong = await client.post("/v1/events", json={"id": "x", "source": "s", "type": "t"},
                                      headers={"Authorization": "Bearer tly_nope"})
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == 401
