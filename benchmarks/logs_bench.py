"""What the log benchmarks need beside the seed: a reading key, log records on a topic as the gateway
publishes them, and the read indexes to drop and restore for the intake drain without them."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import asyncpg
import orjson

from benchmarks import log_records
from benchmarks.kafka_bench import TENANT, Loaded, Message, load
from tally.ingest import auth
from tally.ingest.publish import headers
from tally.schemas.envelope import LOG_EVENT_TYPE, encode, message_key
from tally.settings import ROOT

# The migrations that added indexes for reading logs (docs/adr/0035); without them is the intake before them.
READ_MIGRATIONS = ("0035_log_reads.sql", "0036_log_service_keyset.sql")
_INDEX = re.compile(r"(create|drop) index (\w+)", re.I)


def read_indexes() -> list[str]:
    """The indexes those migrations leave in place (a later one may replace an earlier one's)."""
    names: list[str] = []
    for name in READ_MIGRATIONS:
        for verb, index in _INDEX.findall((ROOT / "deploy" / "migrations" / name).read_text()):
            names = [*names, index] if verb.lower() == "create" else [n for n in names if n != index]
    return names


async def reader_key(url: str) -> str:
    """A fresh key of the seed's tenant with `logs:read`; earlier runs' keys are removed."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("delete from api_keys where name = 'bench-logs-reader'")
        _, secret = await auth.create_key(conn, TENANT, "bench-logs-reader", ["logs:read"])
    finally:
        await conn.close()
    return secret


async def drop_read_indexes(url: str) -> list[str]:
    """Drop the read indexes; returns their definitions, to build them again with."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("select indexname, replace(indexdef, ' ON ONLY ', ' ON ') as indexdef from pg_indexes"
                                " where tablename = 'events' and indexname = any($1::text[])", read_indexes())
        for row in rows:
            await conn.execute(f'drop index "{row["indexname"]}"')
    finally:
        await conn.close()
    return [row["indexdef"] for row in rows]


async def create_indexes(url: str, definitions: list[str]) -> None:
    conn = await asyncpg.connect(url)
    try:
        for definition in definitions:
            await conn.execute(definition)
    finally:
        await conn.close()


async def records(url: str, count: int) -> list[asyncpg.Record]:
    """`count` records of the seed's kind, over the last ten minutes (inside the late-event horizon, so counted)."""
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(log_records.ROWS, *log_records.arguments(
            0, count - 1, count, datetime.now(timezone.utc), timedelta(minutes=10)))
    finally:
        await conn.close()


def load_records(bootstrap: str, topic: str, run: str, rows: list[asyncpg.Record],
                 duplicate_share: float) -> Loaded:
    """The records published as the gateway's POST /v1/logs publishes them (key, value, headers)."""
    now = datetime.now(timezone.utc)
    shared = headers(TENANT, now)

    def message(n: int) -> Message:
        row = rows[n]
        event = {"specversion": "1.0", "id": f"{run}-{row['id']}", "source": f"logs/{row['svc']}",
                 "type": LOG_EVENT_TYPE, "time": row["t"], "subject": row["svc"],
                 "datacontenttype": "application/json", "data": orjson.loads(row["data"])}
        return message_key(TENANT, row["svc"]), encode(event, TENANT, now), shared

    return load(bootstrap, topic, run, len(rows), duplicate_share, message)
