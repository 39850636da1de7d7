"""Product reads cannot starve the intake (security review H4): one tenant's costly word searches run on a
pool of their own, bounded per tenant and by a statement timeout, so another tenant's key that was never
looked up before is still checked and its event accepted."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg

from tally.ingest.auth import create_key
from tally.settings import Settings
from tests.gateway.helpers import event, start_gateway

ROWS = 200_000


async def _logs(conn: asyncpg.Connection, tenant: str) -> None:
    """As the review's probe: one message in 550 has the word, just often enough to keep the search stepping
    through the newest rows rather than asking the full-text index."""
    await conn.execute(
        "insert into events (tenant, source, id, type, subject, time, received_at, data, kafka_partition,"
        " kafka_offset) select $1, 'logs/s', 'r' || n, 'tally.log', 's', now() - n * interval '10 ms', now(),"
        " jsonb_build_object('service', 's', 'level', 'info', 'message',"
        "   case when n % 550 = 0 then 'needle ' else '' end || 'record ' || n), 0, n"
        " from generate_series(1, $2) as n", tenant, ROWS)
    await conn.execute("analyze events")


async def test_hogging_searches_of_one_tenant_leave_another_tenants_key_checks_alone(
    gateway_settings: Settings
) -> None:
    run = uuid.uuid4().hex[:6]
    conn = await asyncpg.connect(gateway_settings.database_url)
    try:
        hog_tenant = f"hog-{run}"
        await _logs(conn, hog_tenant)
        _, hog = await create_key(conn, hog_tenant, "hog", ["logs:read"])
        with start_gateway("gateway-hog", gateway_settings) as gw:
            async with gw.client(hog) as client:
                statuses: list[int] = []

                async def search() -> None:
                    while True:
                        answer = await client.get("/v1/logs", params={"q": "needle", "limit": 1000})
                        statuses.append(answer.status_code)
                        if answer.status_code == 429:
                            await asyncio.sleep(0.05)

                hogs = [asyncio.create_task(search()) for _ in range(8)]
                try:
                    await asyncio.sleep(3)
                    _, fresh = await create_key(conn, f"calm-{run}", "writer", ["events:write", "events:read"])
                    started = time.perf_counter()
                    async with gw.client(fresh) as calm:
                        written = await calm.post("/v1/events", json=event())
                        took = time.perf_counter() - started
                        read = await calm.get("/v1/events")
                finally:
                    for task in hogs:
                        task.cancel()
                    await asyncio.gather(*hogs, return_exceptions=True)
    finally:
        await conn.close()
    assert written.status_code == 202, written.text
    assert took < 2, took
    assert read.status_code == 200, read.text
    assert 500 not in statuses and statuses, statuses


async def test_a_read_past_the_statement_timeout_is_a_503(gateway_settings: Settings) -> None:
    """The server cancels a product read after TALLY_GATEWAY_READ_TIMEOUT_S; the client gets a problem to retry."""
    conn = await asyncpg.connect(gateway_settings.database_url)
    try:
        _, secret = await create_key(conn, f"slow-{uuid.uuid4().hex[:6]}", "reader", ["logs:read"])
    finally:
        await conn.close()
    with start_gateway("gateway-read-timeout", gateway_settings, TALLY_GATEWAY_READ_TIMEOUT_S="0.001") as gw:
        async with gw.client(secret) as client:
            answer = await client.get("/v1/logs", params={"q": "needle"})
            output = gw.process.output()
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json" and "retry-after" in answer.headers
    assert "Traceback" not in output


async def test_a_burst_of_quick_reads_waits_for_the_tenants_slots_instead_of_a_429(gateway_settings: Settings) -> None:
    """A tenant's dashboard reading fast, a few requests at once: each waits briefly for one of the tenant's
    read slots (TALLY_GATEWAY_READ_SLOT_WAIT_S) rather than being refused while others answer in a millisecond."""
    conn = await asyncpg.connect(gateway_settings.database_url)
    try:
        _, reader = await create_key(conn, f"burst-{uuid.uuid4().hex[:6]}", "reader", ["events:read"])
    finally:
        await conn.close()
    with start_gateway("gateway-burst", gateway_settings) as gw:
        async with gw.client(reader) as client:
            answers = await asyncio.gather(*(client.get("/v1/events", params={"limit": 1}) for _ in range(24)))
    assert [a.status_code for a in answers] == [200] * 24, [a.text for a in answers if a.status_code != 200][:2]
