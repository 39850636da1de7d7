"""`tally demo`: post a few events through the gateway, re-send one as a producer's retry would, and
print what PostgreSQL and the counters hold once the processor has handled all of it."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx

from tally.ingest import auth
from tally.sinks.kafka import caught_up
from tally.settings import ROOT, Settings

SOURCE = "tally-demo"
TYPE = "demo.clicked"
SUBJECTS = ("customer-0", "customer-1")
WAIT_S = 30


def key_path(settings: Settings) -> Path:
    """Where the demo keeps its key for this database: a key belongs to the database that holds its hash."""
    return ROOT / ".local" / f"demo-{urlsplit(settings.database_url).path.strip('/') or 'tally'}.key"


async def demo_key(conn: asyncpg.Connection, key_file: Path) -> str:
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


async def day_counters(conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
    rows = await conn.fetch(
        "select subject, window_start, value from counters where tenant = 'demo' and meter = 'events'"
        " and window_name = 'day' and subject = any($1::text[]) and grp->>'type' = $2", list(SUBJECTS), TYPE)
    return {(row["subject"], f"{row['window_start']:%Y-%m-%d}"): int(row["value"]) for row in rows}


async def run_demo(settings: Settings, url: str | None, count: int) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    url = url or f"http://{settings.gateway_host}:{settings.gateway_port}"
    conn = await asyncpg.connect(settings.database_url)
    try:
        secret = await demo_key(conn, key_path(settings))
        before = await day_counters(conn)
        run = uuid.uuid4().hex[:8]
        events = [{"specversion": "1.0", "id": f"demo-{run}-{n}", "source": SOURCE, "type": TYPE,
                   "subject": SUBJECTS[n % len(SUBJECTS)], "data": {"n": n}} for n in range(count)]
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {secret}"}) as client:
            for event in events:
                response = await client.post("/v1/events", json=event)
                print(f"POST /v1/events {event['id']} -> {response.status_code}")
                if response.status_code != 202:
                    print(response.text)
                    return 1
            # What a client library does when a response is lost to a timeout: send the same event again.
            again = await client.post("/v1/events", json=events[0])
            print(f"POST /v1/events {events[0]['id']} again, the same payload (a producer retry) -> {again.status_code}")
            if again.status_code != 202:
                print(again.text)
                return 1

        deadline = time.monotonic() + WAIT_S
        while not await asyncio.to_thread(caught_up, settings.kafka_bootstrap, settings.consumer_group,
                                          settings.topics.events):
            if time.monotonic() > deadline:
                print(f"the processor did not catch up within {WAIT_S} s: is `tally process` running?"
                      " see .local/log/processor.log")
                return 1
            await asyncio.sleep(0.2)

        ids = [event["id"] for event in events]
        rows = await conn.fetch(
            "select id, subject, kafka_partition, kafka_offset, count(*) over (partition by id) as copies from events"
            " where tenant = 'demo' and source = $1 and id = any($2::text[]) order by id", SOURCE, ids)
        print(f"\npersisted in PostgreSQL ({len(rows)} rows for {count} events):")
        for row in rows:
            print(f"  {row['id']}  subject={row['subject']}  kafka={row['kafka_partition']}@{row['kafka_offset']}"
                  f"  copies={row['copies']}")

        after = await day_counters(conn)
        added = {key: value - before.get(key, 0) for key, value in after.items() if value != before.get(key, 0)}
        print(f"\ncounters (meter `events`, type {TYPE}, day window): what this run added")
        for (subject, day), value in sorted(added.items()):
            print(f"  {subject}  {day}  {before.get((subject, day), 0)} -> {after[(subject, day)]}  (+{value})")

        expected = {s: sum(1 for e in events if e["subject"] == s) for s in SUBJECTS}
        by_subject = {s: sum(v for (subject, _), v in added.items() if subject == s) for s in SUBJECTS}
        if sorted(ids) != [row["id"] for row in rows] or by_subject != expected:
            print(f"\nexpected each event stored once and counted once ({expected}), the retry neither:"
                  " see .local/log/processor.log")
            return 1
        print("\neach event stored once and counted once; the retry was recognised as a duplicate")
        return 0
    finally:
        await conn.close()
