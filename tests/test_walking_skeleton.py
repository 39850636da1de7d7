"""End to end through every layer: HTTP -> Kafka -> processor -> PostgreSQL and the counter topic, exactly once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import asyncpg
import httpx
import pytest

from tally.ingest.auth import create_key
from tally.settings import Settings
from tests.processor.helpers import (
    assert_topic_matches_postgres, counter_counts, drained, event_count, expected_counts, wait_for,
)
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


async def test_events_accepted_over_http_are_counted_once_in_postgres_and_on_the_counter_topic(
    isolated: Settings, db: asyncpg.Connection, api_key: tuple[str, str]
) -> None:
    tenant, secret = api_key
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    now = datetime.now(timezone.utc)
    events = [{"specversion": "1.0", "id": f"evt-{n}", "source": "checkout", "type": f"order.{'placed' if n % 3 else 'paid'}",
               "subject": f"customer-{n % 4}", "time": (now - timedelta(minutes=13 * n)).isoformat(), "data": {"n": n}}
              for n in range(60)]
    headers = {"Authorization": f"Bearer {secret}"}
    settings = isolated.model_copy(update={"processor_metrics_port": 0})
    with running("gateway", ["gateway", "--port", str(port)], settings) as gateway, \
            running("processor", ["process"], settings):
        await asyncio.to_thread(wait_until, lambda: _healthy(url), 30, 0.1, "the gateway")
        async with httpx.AsyncClient(base_url=url, headers=headers) as client:
            singles = [await client.post("/v1/events", json=e) for e in events[:30]]
            batch = await client.post("/v1/events/batch", json=events[30:])
            await wait_for(lambda: _drained_with(settings, db, tenant, 60), 60, "the first sends to be persisted")
            # a client's retries, read in later batches: the same events again, one by one and in a batch
            retries = [await client.post("/v1/events", json=e) for e in events[:5]]
            retried_batch = await client.post("/v1/events/batch", json=events[25:35])
        assert [r.status_code for r in singles + retries] == [202] * 35
        assert batch.status_code == retried_batch.status_code == 202, (batch.text, retried_batch.text)
        await wait_for(lambda: drained(settings, db), 60, "the processor to read the retries and publish")
        assert gateway.alive()
    expected = expected_counts(SimpleNamespace(tenant=tenant, time=datetime.fromisoformat(e["time"]),
                                               subject=e["subject"], type=e["type"]) for e in events)
    assert await event_count(db, tenant) == 60
    assert await counter_counts(db, tenant) == expected
    assert await assert_topic_matches_postgres(settings, db, tenant) == len(expected)


async def _drained_with(settings: Settings, db: asyncpg.Connection, tenant: str, events: int) -> bool:
    return await event_count(db, tenant) == events and await drained(settings, db)
