"""`tally demo`: post a few events through the gateway and print them once PostgreSQL has them."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

from ingest import auth
from tally.settings import ROOT, Settings

KEY_FILE = ROOT / ".local" / "demo.key"


async def demo_key(conn: asyncpg.Connection, key_file: Path = KEY_FILE) -> str:
    """Reuse the demo tenant's key across runs, so running the demo twice changes nothing."""
    if key_file.exists():
        secret = key_file.read_text().strip()
        if await conn.fetchval(
            "select 1 from api_keys where key_hash = $1 and revoked_at is null", auth.hash_key(secret)
        ):
            return secret
    _, secret = await auth.create_key(conn, "demo", "demo", ["events:write"])
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(secret)
    return secret


async def run_demo(settings: Settings, url: str | None, count: int) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    url = url or f"http://{settings.gateway_host}:{settings.gateway_port}"
    conn = await asyncpg.connect(settings.database_url)
    try:
        secret = await demo_key(conn)
        run = uuid.uuid4().hex[:8]
        ids = [f"demo-{run}-{i}" for i in range(count)]
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {secret}"}) as client:
            for n, event_id in enumerate(ids):
                event = {"specversion": "1.0", "id": event_id, "source": "tally-demo", "type": "demo.clicked",
                         "subject": f"customer-{n % 2}", "data": {"n": n}}
                response = await client.post("/v1/events", json=event)
                print(f"POST /v1/events {event_id} -> {response.status_code}")
                if response.status_code != 202:
                    print(response.text)
                    return 1
            again = await client.post("/v1/events", json={"id": ids[0], "source": "tally-demo", "type": "demo.clicked"})
            print(f"POST /v1/events {ids[0]} again (a producer retry) -> {again.status_code}")
        deadline = time.monotonic() + 30
        rows: list[asyncpg.Record] = []
        while time.monotonic() < deadline:
            rows = await conn.fetch(
                "select id, tenant, type, subject, time, kafka_partition, kafka_offset from events"
                " where tenant = 'demo' and source = 'tally-demo' and id = any($1::text[]) order by id",
                ids,
            )
            if len(rows) == count:
                break
            await asyncio.sleep(0.2)
        print(f"\npersisted in PostgreSQL ({len(rows)} of {count}, each once):")
        for row in rows:
            print(f"  {row['id']}  tenant={row['tenant']} type={row['type']} subject={row['subject']}"
                  f" kafka={row['kafka_partition']}@{row['kafka_offset']}")
        if len(rows) != count:
            print("not every event arrived within 30 s: is `tally process` running? see .local/log/processor.log")
            return 1
        counters = await conn.fetch(
            "select subject, window_start, value from counters where tenant = 'demo' and meter = 'events'"
            " and window_name = 'day' and subject = any($1::text[]) and grp->>'type' = 'demo.clicked'"
            " order by window_start desc, subject limit 2",
            sorted({row["subject"] for row in rows}),
        )
        print("\ncounters (meter `events`, day window; demo events of every run today, the retry not counted):")
        for counter in counters:
            print(f"  {counter['subject']}  {counter['window_start']:%Y-%m-%d}  {counter['value']}")
        return 0
    finally:
        await conn.close()
